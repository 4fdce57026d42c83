"""The report streams values.npz's [contexts, latents] arrays a block of rows at a time: the reader
returns what np.load does, the distribution plot counts what the whole-array code counted, damage is
a one-line error, and memory stays far below one array's size."""

import tracemalloc
import zipfile

import numpy as np
import pytest

from nlrw_jax.errors import UserError
from nlrw_jax.io import npz_members, npz_row_blocks, save_npz
from nlrw_jax.report.plots import distribution_counts, plot_distributions

FIX = "rerun `nlrw evaluate`"


def _arrays():
    rng = np.random.default_rng(0)
    return {"true": rng.random((53, 6)).astype(np.float32), "ce": np.arange(7.0), "window": np.arange(53),
            "cube": rng.integers(0, 9, (5, 3, 4)).astype(np.int16), "meta": np.array("{}"),
            "fortran": np.asfortranarray(rng.random((9, 4))), "empty": np.zeros((0, 3), np.float32)}


@pytest.mark.parametrize("writer", ["save_npz", "savez", "savez_compressed"])
def test_row_blocks_are_what_np_load_returns(tmp_path, writer):
    arrays = _arrays()
    path = tmp_path / "v.npz"
    if writer == "save_npz":  # "true" written block by block, as evaluate does
        t = arrays.pop("true")
        save_npz(path, arrays, {"true": (t.shape, np.float32, (t[lo:lo + 10] for lo in range(0, 53, 10)))})
    else:
        getattr(np, writer)(path, **arrays)
    with np.load(path) as z:
        want = {k: z[k] for k in z.files}
    assert npz_members(path, FIX) == {k: (a.shape, a.dtype) for k, a in want.items()}
    for name, a in want.items():
        for rows in (1, 3, 7, 10, 53, 100):
            blocks = list(npz_row_blocks(path, name, rows, FIX))
            if a.ndim == 0:
                assert len(blocks) == 1 and blocks[0].shape == () and blocks[0] == a
                continue
            assert all(len(b) <= rows for b in blocks) and len(blocks) == -(-len(a) // rows)
            got = np.concatenate(blocks) if blocks else np.zeros_like(a)
            assert got.dtype == a.dtype and got.shape == a.shape
            np.testing.assert_array_equal(got, a)


def _values(seed=1, n_ctx=41, n_lat=9):
    """Activations like evaluate's: mostly exact zeros, some negative, NaN and inf values."""
    rng = np.random.default_rng(seed)

    def sparse(p, scale):
        return np.where(rng.random((n_ctx, n_lat)) < p, rng.normal(0.5, scale, (n_ctx, n_lat)), 0).astype(np.float32)

    true, raw, norm = sparse(0.2, 1.0), sparse(0.9, 2.0), sparse(0.3, 0.5)
    raw[3, 2], raw[5, 0], norm[7, 1] = np.nan, np.inf, -np.inf
    norm[:, 4] = np.nan  # a latent with no finite prediction
    return {"true": true, "raw": raw, "normalised": norm}


def _old_counts(values, cols):
    """plot_distributions before streaming: whole float64 arrays, fancy-indexed."""
    series = {k: np.asarray(a, float)[:, cols] for k, a in values.items()}
    nz = {k: a[np.isfinite(a) & (a != 0)] for k, a in series.items()}
    hi = max((float(x.max()) for x in nz.values() if len(x)), default=1.0)
    lo = min(min((float(x.min()) for x in nz.values() if len(x)), default=0.0), 0.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 61)
    zeros = {k: 100.0 * float((a[np.isfinite(a)] == 0).mean()) if np.isfinite(a).any() else float("nan")
             for k, a in series.items()}
    return bins, {k: np.histogram(x, bins)[0] for k, x in nz.items()}, zeros


@pytest.mark.filterwarnings("ignore:Data has no positive values")  # all_zero: empty bars on a log axis, as before
@pytest.mark.parametrize("case", ["explained", "every_column", "all_zero"])
def test_streamed_counts_equal_the_whole_array_counts(tmp_path, case):
    values = _values()
    if case == "all_zero":  # no non-zero value anywhere: the default range [0, 1]
        values = {k: np.zeros_like(a) for k, a in values.items()}
    cols = np.ones(9, bool)
    if case != "every_column":
        cols[[0, 6]] = False
    path = tmp_path / "values.npz"
    np.savez(path, **values, ce=np.zeros((3, 41)))
    want_bins, want_counts, want_zeros = _old_counts(values, cols)
    for rows in (1, 4, 41, 64):
        series = {k: (lambda k=k: npz_row_blocks(path, k, rows, FIX)) for k in values}
        bins, counts, zeros = distribution_counts(series, None if cols.all() else cols)
        np.testing.assert_array_equal(bins, want_bins)
        for k in values:
            np.testing.assert_array_equal(counts[k], want_counts[k])
            np.testing.assert_equal(zeros[k], want_zeros[k])
            # the plot draws each bin's left edge weighted by its count: the same bars as the values
            np.testing.assert_array_equal(np.histogram(bins[:-1], bins, weights=counts[k])[0], counts[k])
    res = {"latents": [{"latent": j, "explained": bool(c)} for j, c in enumerate(cols)]}
    note = plot_distributions(path, res, tmp_path / "d.png", FIX)
    z = want_zeros
    assert note == (f"Pooled over {int(cols.sum())} explained latents and 41 evaluation contexts; exact zeros: true "
                    f"{z['true']:.1f}%, raw {z['raw']:.1f}%, normalised {z['normalised']:.1f}%.")
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def _one_line_error(call, path):
    with pytest.raises(UserError) as e:
        call()
    msg = str(e.value)
    assert str(path) in msg and FIX in msg and "\n" not in msg
    return msg


def test_damaged_values_npz_is_a_one_line_error(tmp_path):
    from test_report import _cfg, make_run

    from nlrw_jax.stages.report import VALUES_FIX
    from nlrw_jax.stages.report import run as report

    make_run(tmp_path)
    path = tmp_path / "evaluate" / "values.npz"
    data = path.read_bytes()
    true = np.load(path)["true"]
    path.write_bytes(data[:len(data) // 2])  # truncated: a killed copy
    msg = _one_line_error(lambda: report(_cfg(tmp_path), progress=False), path)
    assert "unreadable" in msg and VALUES_FIX in msg
    _one_line_error(lambda: npz_members(path, FIX), path)
    _one_line_error(lambda: list(npz_row_blocks(path, "true", 4, FIX)), path)
    # a flipped byte inside "true": its CRC fails once the stream reaches the member's end
    at = data.index(true.tobytes()[:64]) + 10
    path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
    _one_line_error(lambda: report(_cfg(tmp_path), progress=False), path)
    assert not (tmp_path / "report" / "report.md").exists()
    path.write_bytes(data)
    assert "missing array(s) nope" in _one_line_error(lambda: list(npz_row_blocks(path, "nope", 4, FIX)), path)


def test_counting_memory_stays_far_below_one_array(tmp_path):
    """3 arrays of 4096 x 8192 float32 (128 MB each), as evaluate writes them: the counting pass peaks
    far below one of them."""
    n_ctx, n_lat, step = 4096, 8192, 256
    path = tmp_path / "values.npz"

    def blocks(seed):  # mostly exact zeros, as activations are; made one block at a time
        rng = np.random.default_rng(seed)
        for _ in range(0, n_ctx, step):
            a = np.zeros((step, n_lat), np.float32)
            a.flat[rng.integers(0, a.size, a.size // 100)] = rng.normal(0, 1, a.size // 100)
            yield a

    save_npz(path, {"ce": np.zeros((3, n_ctx))},
             {k: ((n_ctx, n_lat), np.float32, blocks(i)) for i, k in enumerate(("true", "raw", "normalised"))})
    cols = np.ones(n_lat, bool)
    cols[::7] = False  # the fancy-indexed path, as with unexplained latents
    from nlrw_jax.report.plots import BLOCK_VALUES

    rows = BLOCK_VALUES // n_lat
    series = {k: (lambda k=k: npz_row_blocks(path, k, rows, FIX)) for k in ("true", "raw", "normalised")}
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        _, counts, zeros = distribution_counts(series, cols)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MB"
    assert all(0 < c.sum() < n_ctx * n_lat // 50 for c in counts.values()) and all(98 < z < 100 for z in zeros.values())
    assert zipfile.ZipFile(path).getinfo("true.npy").compress_type == zipfile.ZIP_STORED
