"""Generated gRPC/protobuf stubs (from proto/, by `make proto`). Do not edit by hand."""
