"""Generated gRPC stubs of the SeedOss API (`seedoss.proto`); regenerate with `scripts/gen_proto.sh`."""
