"""eai-delphi 0.1.3's on-disk layout, read and written without delphi (a library module: no config).

Explanations: delphi's pipeline (`delphi.__main__.process_cache`) writes one file per latent,
`<explanations>/<hookpoint>_latent<N>.txt` (the name is str(delphi.latents.Latent)), holding the
explanation as a JSON string (orjson.dumps). When its parser fails it writes the text
"Explanation could not be parsed." instead; we read that as no explanation.

Examples: delphi's LatentCache.save_splits writes, per hookpoint, one file per contiguous latent
range, `<latents>/<hookpoint>/<start>_<end>.safetensors` (end inclusive), each holding
`locations` [n, 3] (token row, position, latent - start; uint16 when both fit, else uint32),
`activations` [n] float16 and `tokens` [rows, ctx] (the whole token array, in every split), and
`<latents>/<hookpoint>/config.json` (its CacheConfig plus model_name). delphi's LatentDataset
reads that back; with constructor example_ctx_len = ctx and center_examples=True (which, despite
the name, keeps whole rows) each row is one example window.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from nlrw_jax.errors import UserError

EXPLANATION_FILE = re.compile(r"^(?P<hookpoint>.+)_latent(?P<latent>\d+)\.txt$")
UNPARSED = ("Explanation could not be parsed.", "No explanation found")  # delphi's failure texts
SPLITS = 5  # delphi's CacheConfig.n_splits default


def hookpoint_for(kind: str, layer: int) -> str:
    """sparsify's hookpoint names, which delphi's coder loaders use: a transcoder reads the MLP
    (`layers.<L>.mlp`), an SAE the residual stream after the layer (`layers.<L>`)."""
    return f"layers.{layer}.mlp" if kind == "transcoder" else f"layers.{layer}"


def explanation_name(hookpoint: str, latent: int) -> str:
    return f"{hookpoint}_latent{latent}.txt"


def read_explanations(folder: Path, hookpoint: str) -> tuple[dict[int, str | None], str, str]:
    """({latent: explanation or None}, digest of the files read, the hookpoint read) from a delphi
    explanations folder, or a delphi run folder holding `explanations/`. A folder naming several
    hookpoints must name `hookpoint`; a folder naming one is read whatever its name."""
    folder = Path(folder).expanduser()
    if (folder / "explanations").is_dir():
        folder = folder / "explanations"
    by_hook: dict[str, dict[int, Path]] = {}
    for path in folder.glob("*.txt"):
        m = EXPLANATION_FILE.match(path.name)
        if m:
            by_hook.setdefault(m["hookpoint"], {})[int(m["latent"])] = path
    if not by_hook:
        raise UserError(f"{folder}: no delphi explanation files (<hookpoint>_latent<N>.txt) in it")
    if hookpoint not in by_hook and len(by_hook) > 1:
        raise UserError(f"{folder}: explanations of hookpoints {sorted(by_hook)}, none of them this coder's "
                        f"({hookpoint})")
    hook = hookpoint if hookpoint in by_hook else next(iter(by_hook))
    out, digest = {}, hashlib.sha256()
    for latent, path in sorted(by_hook[hook].items()):
        raw = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + raw + b"\0")
        try:
            text = json.loads(raw)
        except ValueError:
            raise UserError(f"{path}: not a JSON string (delphi writes each explanation as one)") from None
        if not isinstance(text, str):
            raise UserError(f"{path}: holds a JSON {type(text).__name__}, not a string")
        out[latent] = None if text.strip() in UNPARSED else text
    return out, digest.hexdigest()[:16], hook


def write_explanations(folder: Path, hookpoint: str, explanations: dict[int, str | None]) -> int:
    """One file per explained latent, as delphi writes it; latents without one get no file."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for latent, text in sorted(explanations.items()):
        if text is not None:
            (folder / explanation_name(hookpoint, latent)).write_bytes(json.dumps(text, ensure_ascii=False).encode())
            n += 1
    return n


def write_cache(folder: Path, hookpoint: str, tokens: np.ndarray, locations: np.ndarray, activations: np.ndarray,
                num_latents: int, config: dict) -> None:
    """delphi's latent cache of one hookpoint: `locations` [n, 3] (row, position, latent) and
    `activations` [n] of every recorded firing over the token rows `tokens` [rows, ctx]."""
    from safetensors.numpy import save_file

    hook_dir = folder / hookpoint
    hook_dir.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, num_latents, min(SPLITS, num_latents) + 1).astype(np.int64)
    tokens = np.ascontiguousarray(tokens)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        keep = (locations[:, 2] >= start) & (locations[:, 2] < stop)
        loc = locations[keep].astype(np.int64)
        loc[:, 2] -= start
        small = len(loc) == 0 or (loc[:, 2].max() < 2**16 and loc[:, 0].max() < 2**16)
        save_file({"locations": np.ascontiguousarray(loc.astype(np.uint16 if small else np.uint32)),
                   "activations": activations[keep].astype(np.float16), "tokens": tokens},
                  str(hook_dir / f"{start}_{stop - 1}.safetensors"))
    (hook_dir / "config.json").write_text(json.dumps(config, indent=4))
