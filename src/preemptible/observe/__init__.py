"""Observability: metrics.jsonl and progress.json, experiment trackers, lifecycle lines, plots,
export and status."""
