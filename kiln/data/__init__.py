"""Data pipeline: ingest -> filter -> dedup -> tokenize -> token shards (prepare), and the deterministic,
resumable window loader the trainer reads them with (loader)."""
