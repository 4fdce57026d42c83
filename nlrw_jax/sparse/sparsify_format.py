"""Read and write sparsify's on-disk format: a folder with cfg.json + sae.safetensors.

cfg.json holds SparseCoderConfig's fields plus d_in; the tensors are named after the torch
module's parameters (encoder.weight, encoder.bias, W_dec, b_dec, optional W_skip), so
`sparsify.SparseCoder.load_from_disk` reads what we write and we read what it writes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from nlrw_jax.errors import UserError
from nlrw_jax.io import fsync_folder
from nlrw_jax.sparse.coder import KINDS

# ours -> sparsify's tensor names
_NAMES = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "W_dec", "b_dec": "b_dec",
          "W_skip": "W_skip"}


def _shapes(d_in: int, n: int, skip: bool) -> dict:
    s = {"W_enc": (n, d_in), "b_enc": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    if skip:
        s["W_skip"] = (d_in, d_in)
    return s


def _check_shapes(params: dict, d_in: int, n: int, skip: bool, where: str) -> None:
    want = _shapes(d_in, n, skip)
    if set(params) != set(want):
        raise UserError(f"{where}: tensors {sorted(_NAMES[p] for p in params)} != expected "
                        f"{sorted(_NAMES[p] for p in want)}")
    for name, shape in want.items():
        if tuple(params[name].shape) != shape:
            raise UserError(f"{where}: {_NAMES[name]} has shape {tuple(params[name].shape)}, "
                            f"expected {shape} (d_in={d_in}, num_latents={n})")


def save_sparsify(params: dict, path, *, k: int, kind: str, d_in: int, num_latents: int,
                  extra_cfg: dict | None = None) -> Path:
    """Write `path`/cfg.json + `path`/sae.safetensors atomically (temp folder, then rename)."""
    if kind not in KINDS:
        raise UserError(f"sparse coder kind must be one of {KINDS}, got {kind!r}")
    if not 1 <= k <= num_latents:
        raise UserError(f"k={k} must be between 1 and num_latents={num_latents}")
    path = Path(path)
    skip = "W_skip" in params
    _check_shapes(params, d_in, num_latents, skip, str(path))
    cfg = {
        **(extra_cfg or {}),
        "activation": "topk",
        "expansion_factor": max(num_latents // d_in, 1),  # informational: num_latents wins
        "normalize_decoder": kind == "sae",
        "num_latents": num_latents,
        "k": k,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": kind == "transcoder",
        "d_in": d_in,
    }
    tensors = {_NAMES[name]: np.ascontiguousarray(np.asarray(v)) for name, v in params.items()}

    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # "format": "pt" is what torch-side loaders (transformers, sparsify) expect to see.
        save_file(tensors, str(tmp / "sae.safetensors"), metadata={"format": "pt"})
        with open(tmp / "cfg.json", "w") as f:
            json.dump(cfg, f, indent=2)
        fsync_folder(tmp)
        if path.exists():  # a folder can't be renamed onto a non-empty one: move the old aside
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_sparsify(path, dtype=jnp.float32) -> tuple[dict, dict]:
    """Read a sparsify folder -> (params, dict(k, kind, d_in, num_latents, skip, cfg))."""
    path = Path(path)
    cfg_path, st_path = path / "cfg.json", path / "sae.safetensors"
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise UserError(f"{cfg_path}: not found") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg_path}: cannot read ({e})") from None
    try:
        d_in = int(cfg["d_in"])
        k = int(cfg.get("k", 32))
        n = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{cfg_path}: bad or missing field ({e!r})") from None
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise UserError(f"{cfg_path}: activation {activation!r} is not supported (only 'topk')")
    if not 1 <= k <= n:
        raise UserError(f"{cfg_path}: k={k} must be between 1 and num_latents={n}")
    kind = "transcoder" if cfg.get("transcode", False) else "sae"
    skip = bool(cfg.get("skip_connection", False))

    if not st_path.exists():
        raise UserError(f"{st_path}: not found")
    try:
        raw = load_file(str(st_path))
    except Exception as e:  # safetensors raises its own error types for a bad header/size
        raise UserError(f"{st_path}: cannot read safetensors ({str(e).splitlines()[0]})") from None
    ours = {v: k_ for k_, v in _NAMES.items()}
    unknown = sorted(set(raw) - set(ours))
    if unknown:
        raise UserError(f"{st_path}: unexpected tensors {unknown}")
    params = {ours[name]: v for name, v in raw.items()}
    _check_shapes(params, d_in, n, skip, str(st_path))
    params = {name: jnp.asarray(v).astype(dtype) for name, v in params.items()}
    meta = dict(k=k, kind=kind, d_in=d_in, num_latents=n, skip=skip, cfg=cfg)
    return params, meta
