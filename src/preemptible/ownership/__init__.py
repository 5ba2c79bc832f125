"""Ownership: one run per run directory at a time (a lease that survives crashes and PID namespaces)."""
