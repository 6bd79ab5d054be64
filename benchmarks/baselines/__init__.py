"""Single-machine reference implementations of ingest + features (the yardsticks of the target)."""
