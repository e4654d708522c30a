"""Thin Python SDK for deq-serve: gRPC stubs, numpy in and out, no torch."""
