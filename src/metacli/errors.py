"""Errors that reach the user as one clear paragraph instead of a traceback."""


class MetacliError(Exception):
    """A problem the user can fix; the message says what and where."""


class ConfigError(MetacliError):
    """A setting is missing, misspelt, of the wrong type or impossible."""
