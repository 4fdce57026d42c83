"""Explanations as resumable JSON lines: fixed batches of latents, each appended whole, and the reader.

explanations.jsonl holds {latent, explanation, raw, model, prompt_hash, batch} (explanation null
and `skipped` set for a latent with no activating examples).
"""

from __future__ import annotations

import json
from pathlib import Path

from nlrw_jax.errors import UserError
from nlrw_jax.io import read_batches


def latent_batches(path: Path, latents: list[int], size: int) -> tuple[list[list[int]], dict, list[int]]:
    """(the fixed batches of latents, the complete batches already in `path`, the batch indices to do).
    Batches are fixed by the latent list alone, so a resumed run redoes exactly the missing ones."""
    if size <= 0:
        raise UserError(f"latents per batch must be positive, got {size}")
    batches = [latents[i:i + size] for i in range(0, len(latents), size)]
    done = read_batches(path, {b: len(ls) for b, ls in enumerate(batches)})
    return batches, done, [b for b in range(len(batches)) if b not in done]


def read_explanations(path: Path) -> dict[int, str | None]:
    """{latent: explanation or None (skipped)} from an explanations.jsonl; damage is a one-line error."""
    result = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            raise UserError(f"{path}:{n}: not a JSON record (a torn or garbled line); rerun `nlrw explain` to "
                            f"redo its batch") from None
        latent = rec.get("latent") if isinstance(rec, dict) else None
        if not isinstance(latent, int) or isinstance(latent, bool):
            raise UserError(f"{path}:{n}: not an explanation record (field 'latent' missing or not an integer)")
        text = rec.get("explanation")
        if text is not None and not isinstance(text, str):
            raise UserError(f"{path}:{n}: field 'explanation' of latent {latent} is a {type(text).__name__}, "
                            f"not a string or null")
        result[latent] = text
    return result
