"""Stopping: what asks a run to stop (signals, notices, time limits), how ranks agree on the step
(`vote`), and what follows the agreement (`decision`: save or skip, requeue, exit status)."""
