"""The gRPC service around `deq_server.core`: servicers, scheduler, registry, metrics, app."""
