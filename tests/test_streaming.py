"""Nothing [contexts, latents] beyond one float32 array at the paper's widths (33K contexts x 32K
latents): the pieces `nlrw calibrate` and `nlrw evaluate` stream with are equal to the whole-array
computations they replace. Predictions are read for some context rows, reduced shard by shard;
calibrations apply to any rows; specificity / sensitivity add up over blocks of rows; values.npz
is written block by block."""

import tracemalloc

import numpy as np
import pytest

from nlrw_jax.errors import UserError
from nlrw_jax.io import save_npz
from nlrw_jax.rewrite import calibrate as C
from nlrw_jax.rewrite import quantile as Q
from nlrw_jax.rewrite import simulate as S
from nlrw_jax.rewrite.metrics import active_counts, active_rates, rates_from_counts
from nlrw_jax.run_folder import RunFolder


def write_shards(root, n_contexts, latents, contexts_per_shard, latents_per_shard, seed=0):
    """A simulate folder's shards of random digit log-probs (some -inf: digits outside the top N)."""
    run = RunFolder(root)
    grid = S.shard_grid(n_contexts, len(latents), contexts_per_shard, latents_per_shard)
    rng = np.random.default_rng(seed)
    lp = np.log(rng.dirichlet(np.ones(10), (n_contexts, len(latents)))).astype(np.float32)
    lp[rng.random(lp.shape) < 0.2] = -np.inf
    (run.dir("simulate") / "shards").mkdir(parents=True)
    for k, (c0, c1, l0, l1) in enumerate(grid):
        save_npz(run.shard(k), dict(logprobs=lp[c0:c1, l0:l1], contexts=np.array([c0, c1]), latents=latents[l0:l1]))
    return run, grid, lp


@pytest.mark.parametrize("rows", [slice(None), slice(7, 23), slice(30, 30), np.array([25, 3, 3, 17, 0, 29])])
def test_rows_of_the_predictions_equal_the_whole(tmp_path, rows):
    latents = np.arange(11, dtype=np.int32) * 5
    run, grid, lp = write_shards(tmp_path, 30, latents, contexts_per_shard=4, latents_per_shard=3)
    whole = run.read_predictions(grid, latents, 30)
    np.testing.assert_array_equal(whole, lp)
    np.testing.assert_array_equal(run.read_predictions(grid, latents, 30, rows), lp[rows])
    for readout in S.READOUTS:
        got = run.read_predictions(grid, latents, 30, rows, lambda x: S.expected_digit(x, readout))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, S.expected_digit(lp, readout)[rows])  # bit for bit


def test_only_the_shards_of_the_rows_are_read_and_checked(tmp_path):
    latents = np.arange(6, dtype=np.int32)
    run, grid, lp = write_shards(tmp_path, 12, latents, contexts_per_shard=4, latents_per_shard=3)
    # shard 0 (contexts 0-3): NaN; rows 4-11 never read it
    bad = dict(np.load(run.shard(0)))
    bad["logprobs"][1, 2, 3] = np.nan
    save_npz(run.shard(0), bad)
    np.testing.assert_array_equal(run.read_predictions(grid, latents, 12, slice(4, 12)), lp[4:])
    with pytest.raises(UserError, match="NaN or positive log-probs in the predictions of latent 2"):
        run.read_predictions(grid, latents, 12, slice(3, 5))
    # a missing shard is refused whatever the rows: the simulation is unfinished
    run.shard(5).unlink()
    with pytest.raises(UserError, match="1 of 6 shards missing \\(first: 5\\)"):
        run.read_predictions(grid, latents, 12, slice(0, 1))


def test_reduced_predictions_never_hold_the_logprobs(tmp_path):
    """The reader's peak memory is the reduced array plus about one shard, not [rows, latents, 10]."""
    latents = np.arange(512, dtype=np.int32)
    run, grid, _ = write_shards(tmp_path, 2048, latents, contexts_per_shard=64, latents_per_shard=128)
    full = 2048 * 512 * 10 * 4
    tracemalloc.start()
    try:
        got = run.read_predictions(grid, latents, 2048, reduce=lambda x: S.expected_digit(x, "renormalised"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got.shape == (2048, 512) and peak < got.nbytes + full // 8, (peak, got.nbytes, full)


def test_raw_values_in_place_equal_the_raw_mapping():
    rng = np.random.default_rng(1)
    expected = (rng.random((300, 7)) * 9).astype(np.float32)
    explained = np.array([True, False, True, True, False, True, True])
    max_act = rng.random(7).astype(np.float32) * 5
    want = np.where(explained, S.raw_activation(expected, max_act), 0.0).astype(np.float32)
    got = C.raw_values(expected, explained, max_act)
    assert got is expected  # no second [contexts, latents] array
    np.testing.assert_array_equal(got, want)


def test_true_values_of_rows_in_blocks_equal_the_whole():
    rng = np.random.default_rng(2)
    n, k, lat = 10, 16, 1 << 18  # k x latents = 2^22: blocks of 4 rows
    contexts = {"top_idx": rng.integers(0, lat, (n, k)).astype(np.int32),
                "top_acts": rng.random((n, k)).astype(np.float32)}
    latents = np.unique(np.concatenate([contexts["top_idx"][:, :3].ravel(), rng.integers(0, lat, 2000)]))
    hit = contexts["top_idx"][:, :, None] == latents[None, None, :]  # the former one-array formula
    want = np.where(hit, contexts["top_acts"][:, :, None], 0.0).max(axis=1).astype(np.float32)
    np.testing.assert_array_equal(S.true_values(contexts, latents), want)
    rows = np.array([9, 2, 2, 5])
    np.testing.assert_array_equal(S.true_values(contexts, latents, rows), want[rows])
    np.testing.assert_array_equal(S.true_values(contexts, latents, slice(3, 8)), want[3:8])


def test_a_map_applied_to_some_rows_equals_it_applied_to_all(tmp_path):
    rng = np.random.default_rng(3)
    raw = (rng.random((200, 9)) * rng.random(9) * 4).astype(np.float32)
    raw[rng.random(raw.shape) < 0.5] = 0.0
    true_q = np.sort(rng.random((9, len(Q.quantile_levels()))), axis=1)
    pk, tk = Q.fit_quantile_map(raw, true_q, Q.quantile_levels(), "type8")
    latents, explained = np.arange(9), np.arange(9) % 4 != 1
    path = tmp_path / "map.npz"
    Q.save_quantile_map(path, Q.quantile_levels(), pk, tk, latents, {})
    whole = C.normalised_values(path, raw, latents, explained)
    m = C.load_map(path, latents)
    for rows in (slice(0, 7), slice(150, 200), np.array([199, 0, 5, 5, 64])):
        np.testing.assert_array_equal(C.apply_map(m, raw[rows], explained), whole[rows])
    with pytest.raises(UserError, match="other latents"):
        C.load_map(path, latents + 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_rates_streamed_over_blocks_equal_active_rates(seed):
    rng = np.random.default_rng(seed)
    n, lat = 1000, 40
    true = np.where(rng.random((n, lat)) < 0.05, rng.random((n, lat)), 0.0).astype(np.float32)
    true[:, 3] = 0.0  # never active: sensitivity NaN
    pred = (rng.random((n, lat)) * (0.3 + true)).astype(np.float32)
    threshold = rng.random(lat).astype(np.float32) * 0.2
    want = active_rates(pred, true, threshold)
    counts = sum(active_counts(pred[lo:lo + 37], true[lo:lo + 37], threshold) for lo in range(0, n, 37))
    got = rates_from_counts(counts)
    np.testing.assert_array_equal(got["specificity"], want["specificity"])
    np.testing.assert_array_equal(got["sensitivity"], want["sensitivity"])
    assert np.isnan(got["sensitivity"][3])
    for key in ("pooled_specificity", "pooled_sensitivity"):
        assert got[key] == want[key]
    # no active context at all: the pooled sensitivity is NaN, as before
    none = rates_from_counts(active_counts(pred, np.zeros_like(true), threshold))
    assert np.isnan(none["pooled_sensitivity"]) and none["pooled_specificity"] > 0


def test_values_npz_written_in_row_blocks(tmp_path):
    rng = np.random.default_rng(4)
    a = rng.random((53, 6)).astype(np.float32)
    path = tmp_path / "values.npz"
    save_npz(path, dict(ce=np.arange(3.0), meta=np.array("{}")),
             {"a": (a.shape, np.float32, (a[lo:lo + 10] for lo in range(0, 53, 10)))})
    with np.load(path) as z:
        assert sorted(z.files) == ["a", "ce", "meta"]
        np.testing.assert_array_equal(z["a"], a)
        np.testing.assert_array_equal(z["ce"], np.arange(3.0))
    with pytest.raises(ValueError, match="50 rows written of 53"):
        save_npz(path, {}, {"a": (a.shape, np.float32, (a[lo:lo + 10] for lo in range(0, 50, 10)))})
    with np.load(path) as z:  # the failed write left the previous file
        np.testing.assert_array_equal(z["a"], a)
