"""The one exception type of the pipeline; it imports nothing, so every module may use it."""


class UnicomError(Exception):
    """An error caused by bad input or configuration; the CLI prints it as one line."""
