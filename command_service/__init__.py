"""Write side of the order service: commands, the Order aggregate, handlers, event store, relay and gRPC API."""
