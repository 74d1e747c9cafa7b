"""The wire: the visible-token codec, protobuf serialisation, gRPC plumbing, credentials."""
