"""The command service's gRPC API: one table of RPCs per service (`orders`, `customers`) over one `runner`."""
