"""`python -m deq_server`: the gRPC server (same as `deq-server`)."""

from deq_server.serving.app import main

main()
