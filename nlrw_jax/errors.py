"""One exception type for bad input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (path, config, checkpoint, data); message names what is wrong."""


def clear_progress_bars() -> None:
    """Erases every progress bar still open (a stage that failed mid-way), so the
    `nlrw: error: ...` printed next is the one line left on the terminal, not glued to a bar."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):  # tqdm's registry of live bars
        bar.leave = False
        bar.close()
