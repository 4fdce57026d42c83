"""Number and table formatting for the report (markdown)."""

from __future__ import annotations

import math

import numpy as np

VARIANTS = ("raw", "normalised")
SELECTIONS = ("top", "random")
FIXED = ("clean", "transcoder", "zero_ablation", "mean_ablation", "coder_zero", "latent_means")
FIXED_LABELS = {"clean": "clean", "transcoder": "transcoder", "zero_ablation": "zero ablation",
                "mean_ablation": "mean ablation", "coder_zero": "coder, every latent at 0 (b_dec + skip)",
                "latent_means": "coder, every latent at its mean"}
BASELINES = ("zero_ablation", "mean_ablation", "coder_zero", "latent_means")  # what a rewrite must beat


def isnum(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def num(x, d: int = 4) -> str:
    return f"{x:.{d}f}" if isnum(x) else "n/a"


def ci_text(ci, d: int = 4) -> str:
    return f"[{num(ci[0], d)}, {num(ci[1], d)}]" if ci and len(ci) == 2 else "n/a"


def pm(c: dict | None, key: str = "ce", d: int = 4) -> str:
    """A condition's CE (key="ce"), its increase over clean (key="delta_vs_clean") or its KL to clean
    (key="kl") as mean ± half the 95% CI width."""
    if c is None:
        return "—"
    fmt = signed if key == "delta_vs_clean" else num
    lo, hi = (c.get({"ce": "ce_ci", "kl": "kl_ci"}.get(key, "delta_ci")) or [None, None])[:2]
    if isnum(lo) and isnum(hi):
        return f"{fmt(c[key], d)} ± {(hi - lo) / 2:.{d}f}"
    return fmt(c.get(key), d)


def signed(x, d: int = 4) -> str:
    return f"{x:+.{d}f}" if isnum(x) else "n/a"


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return out


def frac(f) -> str:
    if not isnum(f):
        return str(f)
    s = f"{f:g}"
    return s if any(ch in s for ch in ".e") else s + ".0"


def plural(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "s")


def condition_label(c: dict) -> str:
    if c["name"] in FIXED_LABELS:
        return FIXED_LABELS[c["name"]]
    return f"{c['name']} ({c.get('selection')}, {frac(c.get('fraction'))})"
