"""Optional dependencies: each belongs to one extra of pyproject.toml (`pip install 'nlrw_jax[EXTRA]'`).

A stage imports an optional module through `require`, so a missing one stops it with one line
naming the module, what it is for, and the extra that provides it, not a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from nlrw_jax.errors import UserError


def require(module: str, extra: str, what: str, *, stage: str | None = None) -> ModuleType:
    """The imported `module`, or a UserError of one line such as
    `nlrw report needs matplotlib (the plots): pip install 'nlrw_jax[report]'`.
    `what` says what the module is for; `stage` names the command that needs it (default: the
    extra's name, which is the stage for `report`)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        # e.name is the package actually missing: `module` itself, or one of its own dependencies
        missing = (e.name or module).split(".")[0]
        raise UserError(f"nlrw {stage or extra} needs {missing} ({what}): pip install 'nlrw_jax[{extra}]'") from None
