"""Errors that reach the user as one clear paragraph instead of a traceback."""


class MetacliError(Exception):
    """A problem the user can fix; the message says what and where."""


class ConfigError(MetacliError):
    """A setting is missing, misspelt, of the wrong type or impossible."""


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation that failed (host or device memory)."""
    text = str(err)
    return (
        isinstance(err, MemoryError)
        or type(err).__name__ == "OutOfMemoryError"  # torch's, for a device
        or "can't allocate memory" in text  # torch's CPU allocator
        or "out of memory" in text.lower()
    )
