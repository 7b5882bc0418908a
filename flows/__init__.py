"""Prefect flows of mergealign: the study, single merge, evaluation and the demo zoo."""
