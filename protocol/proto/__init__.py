"""Generated gRPC stubs for the V2 inference service (see inference.proto), shared by server and client."""
