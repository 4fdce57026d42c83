"""The report's statistics: rank correlation, paired differences between conditions, the sweep."""

from __future__ import annotations

import numpy as np

from nlrw_jax.report.format import isnum, num, signed
from nlrw_jax.rewrite.metrics import bootstrap


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (1-based)."""
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    avg = np.cumsum(counts) - (counts - 1) / 2.0
    return avg[inv]


def spearman(x, y) -> float:
    """Spearman's rank correlation over the finite pairs (NaN when fewer than 3 or constant)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    try:
        from scipy.stats import spearmanr

        return float(spearmanr(x, y).statistic)
    except ImportError:
        return float(np.corrcoef(_rank(x), _rank(y))[0, 1])


def column(latents: list[dict], key: str) -> np.ndarray:
    return np.array([lat.get(key) if isnum(lat.get(key)) else np.nan for lat in latents], float)


class RunResults:
    def __init__(self, res: dict, values: dict | None):
        self.res, self.values = res, values
        self.conditions = res.get("conditions", [])
        self.fractions = sorted({c["fraction"] for c in self.conditions if "fraction" in c})
        self.fmax = max(self.fractions) if self.fractions else None
        ce = values.get("ce") if values else None
        self.ce = ce if ce is not None and len(ce) == len(self.conditions) else None

    def find(self, name: str, selection: str | None = None, fraction: float | None = None) -> dict | None:
        for c in self.conditions:
            if c["name"] == name and (selection is None or c.get("selection") == selection) and \
                    (fraction is None or c.get("fraction") == fraction):
                return c
        return None

    def index(self, c: dict) -> int:
        return next(i for i, x in enumerate(self.conditions) if x is c)

    def paired_diff(self, a: dict, b: dict, n: int = 1000, seed: int = 0,
                    key: str = "ce") -> tuple[float, list[float]] | None:
        """Mean CE(a) - CE(b) (or KL, key="kl") over the same contexts, with a bootstrap 95% CI that
        resamples whole windows (values.npz "window"; contexts of one window are correlated)."""
        arr = self.values.get(key) if self.values else None
        if arr is None or len(arr) != len(self.conditions):
            return None
        d = arr[self.index(a)] - arr[self.index(b)]
        window = self.values.get("window")
        ok = np.isfinite(d)
        if not ok.any():
            return None
        boot = bootstrap(d[ok][None], n, seed, None if window is None else np.asarray(window)[ok])[:, 0]
        return float(d[ok].mean()), [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def compare(run: RunResults, a: dict, b: dict) -> str:
    """Words for how certain 'CE(a) vs CE(b)' is: the paired difference's CI, else CI overlap."""
    pd = run.paired_diff(a, b)
    if pd is not None:
        m, (lo, hi) = pd
        where = "excludes 0" if lo > 0 or hi < 0 else "includes 0: the difference is within the CI"
        return f"paired difference {signed(m)} nats, 95% CI [{num(lo)}, {num(hi)}] ({where})"
    (alo, ahi), (blo, bhi) = a["ce_ci"], b["ce_ci"]
    overlap = isnum(alo) and isnum(bhi) and alo <= bhi and blo <= ahi
    return "the 95% CIs overlap (within the CI)" if overlap else "the 95% CIs do not overlap"


def sweep_entries(res: dict) -> list[dict]:
    """calibration_sweep rows with the estimator and size parsed from the variant name."""
    out = []
    for s in res.get("calibration_sweep", []):
        v = s["variant"]
        if v == "raw":
            est, size = None, None
        elif v == "normalised":
            est, size = res.get("estimator"), res.get("calibration_contexts")
        else:
            parts = v.split(":")
            est, size = (parts[1], int(parts[2])) if len(parts) == 3 and parts[2].isdigit() else (None, None)
        out.append({**s, "estimator": est, "size": size})
    return out


def rewrite_variants(run: RunResults) -> list[str]:
    """The simulated-value variants (raw, normalised, every calibration of the sweep), in results order."""
    from nlrw_jax.report.format import FIXED

    return list(dict.fromkeys(c["name"] for c in run.conditions if c["name"] not in FIXED))


def whole_layer(run: RunResults, variant: str) -> dict | None:
    """The variant's condition with the whole layer rewritten: every latent (never-simulated ones as
    0) when only some were simulated, else the top selection at the largest fraction."""
    res = run.res
    if res.get("latents_simulated", 0) < res.get("latents_total", 0) and run.find(variant, "all_latents"):
        return run.find(variant, "all_latents")
    return run.find(variant, "top", run.fmax)


def beats(run: RunResults, a: dict, b: dict) -> bool | None:
    """Whether CE(a) < CE(b) beyond the paired 95% CI (None without per-context values)."""
    pd = run.paired_diff(a, b)
    return None if pd is None else pd[1][1] < 0


def paired_between(a: RunResults, ca: dict, b: RunResults, cb: dict, key: str = "ce", n: int = 1000,
                   seed: int = 0) -> tuple[float, list[float]] | None:
    """Mean key(cb in run b) - key(ca in run a) over the same evaluation contexts of two runs, with the
    window-resampling 95% CI; None unless both runs' values.npz hold the same (window, position) pairs."""
    va, vb = a.values or {}, b.values or {}
    arr_a, arr_b = va.get(key), vb.get(key)
    if arr_a is None or arr_b is None or len(arr_a) != len(a.conditions) or len(arr_b) != len(b.conditions):
        return None
    for k in ("window", "positions"):
        if k not in va or k not in vb or not np.array_equal(va[k], vb[k]):
            return None
    d = arr_b[b.index(cb)] - arr_a[a.index(ca)]
    ok = np.isfinite(d)
    if not ok.any():
        return None
    boot = bootstrap(d[ok][None], n, seed, np.asarray(va["window"])[ok])[:, 0]
    return float(d[ok].mean()), [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
