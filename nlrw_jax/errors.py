"""One exception type for bad input: the CLI prints its message on one line and exits 2."""

from __future__ import annotations

import contextlib


class UserError(Exception):
    """Bad input from the user (path, config, checkpoint, data); message names what is wrong."""


@contextlib.contextmanager
def bars_cleared_on_error(*bars):
    """Progress bars that a failure erases instead of leaving half-drawn (tqdm clears the line), so
    the `nlrw: error: ...` printed next is the one line left on the terminal, not glued to a bar."""
    try:
        yield
    except BaseException:
        for bar in bars:
            bar.leave = False
            bar.close()
        raise
