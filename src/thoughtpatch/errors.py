"""One exception type for user-facing errors: the CLI prints its message on one line."""


class ThoughtpatchError(Exception):
    """A problem with the user's input (file, row, field or key named in the message)."""
