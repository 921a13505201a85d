"""Generated protobuf and gRPC code (``make proto`` from protos/); never edited by hand."""
