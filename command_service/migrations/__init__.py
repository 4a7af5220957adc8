"""Versioned SQL migrations of the event store: `NNNN_name.sql`, applied in order, each exactly once."""
