"""One exception type for bad input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (path, config, checkpoint, data); message names what is wrong."""
