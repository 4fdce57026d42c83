"""The two kinds of failure a scheduler can act on, and what the CLI prints for them.

Each prints one line, `nlrw: error: ...`, and exits with its own status:
- UserError (2): bad input (path, config, checkpoint, data). Rerunning the same command fails
  the same way: fix the input first.
- ServiceUnavailable (75, EX_TEMPFAIL): something outside is not there now (LLM servers past
  the retry budget, storage, a run folder held by another process). Rerunning later may work,
  so a Slurm array can retry these and not the others.
"""

EXIT_USER_ERROR = 2
EXIT_TEMPFAIL = 75  # sysexits.h EX_TEMPFAIL


class UserError(Exception):
    """Bad input from the user (path, config, checkpoint, data); message names what is wrong."""

    exit_status = EXIT_USER_ERROR


class ServiceUnavailable(Exception):
    """A service or resource that may come back (LLM servers, storage, a busy run folder)."""

    exit_status = EXIT_TEMPFAIL


def clear_progress_bars() -> None:
    """Erases every progress bar still open (a stage that failed mid-way), so the
    `nlrw: error: ...` printed next is the one line left on the terminal, not glued to a bar."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):  # tqdm's registry of live bars
        bar.leave = False
        bar.close()
