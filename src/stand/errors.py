"""The one exception type for user mistakes: the CLI prints its message and exits 2."""


class StandError(ValueError):
    """Bad input from a user (a parameter, a path, a prompt); the message names what was wrong."""
