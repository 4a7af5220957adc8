"""Operator tooling: the `cqrs` command line, the local development stack (`make dev`) and its servers."""
