"""ctxgraph: content-addressed, immutable shared memory for agents, on SQLite (see docs/ctxgraph.md)."""
