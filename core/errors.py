"""One exception type for user-facing problems: the CLI prints its message alone, without a traceback."""


class WorkbenchError(Exception):
    """A problem with the user's input or environment, phrased so that the message alone explains it."""
