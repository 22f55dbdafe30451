"""The one exception type for a user's configuration mistake; the command prints its message, not a traceback."""


class ConfigError(ValueError):
    """A setting the user must change: the message says which one and to what.

    A ``ValueError`` subclass, so code that catches ``ValueError`` keeps working.
    """
