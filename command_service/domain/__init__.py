"""The pure write model of the Order aggregate: commands, validation, `decide` and `evolve` (no I/O)."""
