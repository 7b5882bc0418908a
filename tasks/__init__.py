"""Prefect tasks: thin wrappers over mergealign/ with cache keys, retries and artifacts."""
