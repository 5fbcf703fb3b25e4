"""gRPC metrics tests (a package: their helpers import by package, not by a
top-level name another tests folder could also take)."""
