"""Small file helpers shared by the stages: atomic JSON writes and resumable JSON-lines logs."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, obj) -> None:
    """Temp file then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def truncate_jsonl(path: Path, step: int) -> None:
    """Drops log lines past the restored step, so a resumed run logs each step once."""
    path = Path(path)
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))
