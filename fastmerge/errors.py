"""One exception type for every user-facing failure: its message is the one line the CLI prints."""


class FastmergeError(Exception):
    """Bad input or an impossible request; the message names the file, tensor or key."""
