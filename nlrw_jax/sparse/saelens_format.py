"""Read SAELens's on-disk format: a folder with cfg.json + sae_weights.safetensors.

SAELens stores W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] and a
cfg.json with `architecture`, d_in, d_sae, apply_b_dec_to_input, normalize_activations and, for
"topk", k (SAELens >= 6; older files put it in activation_fn_kwargs). The hook point is in
`metadata.hook_name` (>= 6) or `hook_name` / `hook_layer` (older), in TransformerLens's names.

Only what maps onto our TopK encoder exactly is read: the "topk" architecture, an SAE on the
residual stream. Its encoder is top-k of (x - b_dec*apply_b_dec_to_input) @ W_enc + b_enc, then
ReLU: the same latents and values as our ReLU-then-top-k (the k largest are positive, or zero
either way). Without apply_b_dec_to_input the b_dec term is folded into b_enc, and
rescale_acts_by_decoder_norm is folded into W_enc, b_enc and W_dec, so the result encodes and
decodes the same. ReLU, JumpReLU and gated SAEs and SAELens's (ReLU) transcoders have no fixed k
and are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from nlrw_jax.errors import UserError

WEIGHTS = "sae_weights.safetensors"
# SAELens's registered architectures that are not a TopK encoder: refused with the reason.
NOT_TOPK = {"standard", "gated", "jumprelu", "abstopk", "batchtopk", "matryoshka_batchtopk", "transcoder",
            "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder", "temporal", "matching_pursuit"}
# TransformerLens hook name -> (our capture point, layer offset): resid_pre of layer L+1 is resid_post of L.
_HOOKS = {"hook_resid_post": ("resid_post", 0), "hook_resid_pre": ("resid_post", -1)}


def load_saelens(path, dtype=np.float32) -> tuple[dict, dict]:
    """A SAELens folder -> (params in our layout, meta: k, kind, d_in, num_latents, skip, layer, point, cfg).
    layer / point are None where the file does not say (or says a hook we do not capture: point is the name)."""
    path = Path(path)
    cfg_path, st_path = path / "cfg.json", path / WEIGHTS
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise UserError(f"{cfg_path}: not found") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg_path}: cannot read ({e})") from None
    arch = cfg.get("architecture", "standard")  # SAELens < 4 wrote no architecture: a ReLU SAE
    if arch in NOT_TOPK:
        raise UserError(f"{cfg_path}: SAELens architecture {arch!r} is not a TopK encoder (no fixed k); "
                        f"only 'topk' can be imported")
    if arch != "topk":
        raise UserError(f"{cfg_path}: unknown SAELens architecture {arch!r}; only 'topk' can be imported")
    for key in ("normalize_activations", "reshape_activations"):
        if cfg.get(key, "none") not in ("none", None):
            raise UserError(f"{cfg_path}: {key}={cfg[key]!r} is not supported (only 'none')")
    try:
        d_in, n = int(cfg["d_in"]), int(cfg["d_sae"])
        k = int(cfg["k"] if "k" in cfg else (cfg.get("activation_fn_kwargs") or {})["k"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{cfg_path}: bad or missing field ({e!r})") from None
    if not 1 <= k <= n:
        raise UserError(f"{cfg_path}: k={k} must be between 1 and d_sae={n}")

    if not st_path.exists():
        raise UserError(f"{st_path}: not found")
    try:
        raw = load_file(str(st_path))
    except Exception as e:  # safetensors raises its own error types for a bad header/size
        raise UserError(f"{st_path}: cannot read safetensors ({str(e).splitlines()[0]})") from None
    want = {"W_enc": (d_in, n), "b_enc": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    if set(raw) != set(want):
        raise UserError(f"{st_path}: tensors {sorted(raw)} != expected {sorted(want)}")
    for name, shape in want.items():
        if tuple(raw[name].shape) != shape:
            raise UserError(f"{st_path}: {name} has shape {tuple(raw[name].shape)}, expected {shape} "
                            f"(d_in={d_in}, d_sae={n})")
    f64 = {name: raw[name].astype(np.float64) for name in want}  # fold in float64, then cast once
    W_enc, b_enc, W_dec, b_dec = f64["W_enc"].T, f64["b_enc"], f64["W_dec"], f64["b_dec"]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc.T  # ours always encodes x - b_dec
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norm = np.linalg.norm(W_dec, axis=-1)  # pre * |d_j| chosen and kept, decoded by W_dec / |d_j|
        W_enc, b_enc, W_dec = W_enc * norm[:, None], b_enc * norm, W_dec / norm[:, None]
    params = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    params = {name: np.ascontiguousarray(v, dtype=dtype) for name, v in params.items()}

    meta_cfg = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook = meta_cfg.get("hook_name") or cfg.get("hook_name")
    layer, point = None, None
    if isinstance(hook, str):
        m = re.fullmatch(r"blocks\.(\d+)\.(\w+)", hook)
        if m and m.group(2) in _HOOKS:
            point, offset = _HOOKS[m.group(2)]
            layer = int(m.group(1)) + offset
        else:
            point = hook  # a hook we do not capture: the caller names it in its refusal
    elif cfg.get("hook_layer") is not None:
        layer = int(cfg["hook_layer"])
    meta = dict(k=k, kind="sae", d_in=d_in, num_latents=n, skip=False, layer=layer, point=point, cfg=cfg)
    return params, meta
