"""`python -m deq_server`: today the bundled-model demo; the gRPC server will take this entry."""

from deq_server.demo import main

main()
