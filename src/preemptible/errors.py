"""Errors a user can fix: the recipe prints them as one line and exits non-zero."""


class ConfigError(ValueError):
    """A bad value in the configuration or on disk; the message names it and the fix."""


class CheckpointError(RuntimeError):
    """A save could not be completed; the previous committed checkpoint is untouched and still latest."""


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file names code or classes a checkpoint never holds; nothing of it was loaded."""
