"""The one error class of the data package (a ValueError, so the command-line tools report it)."""


class DataError(ValueError):
    """Data that cannot be used as configured; the message names the problem and the fix."""
