import json

import jax
import numpy as np
import pytest

from nlrw_jax.errors import UserError
from nlrw_jax.rewrite.quantile import (
    METHODS,
    apply_quantile_map,
    apply_quantile_map_numpy,
    check_monotone,
    fit_quantile_map,
    load_quantile_map,
    quantile_levels,
    save_quantile_map,
    true_quantiles,
)

LEVELS = quantile_levels()


def _dense(nonzero, n_total):
    return np.concatenate([np.zeros(n_total - len(nonzero)), nonzero])


def _map(pk, tk, preds):
    return np.asarray(apply_quantile_map(pk, tk, np.asarray(preds, np.float32)))


def test_quantile_levels():
    lv = quantile_levels()
    assert lv.dtype == np.float64
    assert lv[0] == 0 and lv[-1] == 1 and np.all(np.diff(lv) > 0)
    for q in (0.5, 0.9, 0.99, 1 - 1e-6):
        assert np.min(np.abs(lv - q)) < 1e-12
    assert np.sum(lv > 0.99) > 30  # dense in the firing tail
    assert np.sum(lv < 0.9) == 90
    with pytest.raises(UserError):
        quantile_levels(tail_max=1e-7)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("n_total,n_nonzero", [
    (1000, 10), (1000, 0), (50, 50), (1, 1), (1, 0), (2, 1), (3, 1), (3, 2), (3, 3),
    (10007, 97), (200000, 2000)])
def test_true_quantiles_match_dense(method, n_total, n_nonzero):
    rng = np.random.default_rng(n_total * 7 + n_nonzero)
    nonzero = rng.exponential(2.0, n_nonzero) + 0.01
    if n_nonzero > 3:
        nonzero[:2] = 0.0  # explicit zeros inside `nonzero` are just values
        nonzero[2:4] = nonzero[4]  # ties
    levels = np.concatenate([LEVELS, rng.uniform(size=50)])
    levels.sort()
    got = true_quantiles(rng.permutation(nonzero), n_total, levels, method)
    want = np.quantile(_dense(nonzero, n_total), levels, method=METHODS[method])
    assert got.shape == levels.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


def test_true_quantiles_errors():
    with pytest.raises(UserError, match="n_total"):
        true_quantiles(np.zeros(0), 0, LEVELS, "empirical")
    with pytest.raises(UserError, match="negative"):
        true_quantiles(np.array([1.0, -0.5]), 10, LEVELS, "type8")
    with pytest.raises(UserError):
        true_quantiles(np.ones(5), 3, LEVELS, "empirical")
    with pytest.raises(UserError, match="unknown quantile method"):
        true_quantiles(np.ones(5), 10, LEVELS, "type6")
    assert np.all(true_quantiles(np.zeros(0), 100, LEVELS, "type8") == 0)


def _true_q(rng, n_lat, n_total=5000, frac=1.0, method="empirical"):
    return np.stack([true_quantiles(rng.exponential(1.0 + j, int(n_total * frac)), n_total, LEVELS, method)
                     for j in range(n_lat)])


def test_fit_without_ties():
    rng = np.random.default_rng(0)
    calib = rng.gamma(2.0, size=(20, 4))
    tq = _true_q(rng, 4)
    knots = {}
    for method in METHODS:
        pk, tk = fit_quantile_map(calib, tq, LEVELS, method)
        assert pk.dtype == tk.dtype == np.float32 and pk.shape == tk.shape == (4, LEVELS.size)
        want = np.quantile(calib, LEVELS, axis=0, method=METHODS[method]).T
        np.testing.assert_allclose(pk, want, rtol=1e-6)
        # Distinct predictions: knots not in a run of equal values keep the true quantiles.
        # (Type 8 clamps levels beyond (C -/+ 1/3) / (C + 1/3) to the min/max, so its end
        # knots do form runs even here; type 7 knots strictly increase.)
        d = np.diff(pk, axis=1) > 0
        single = np.concatenate([d[:, :1], d[:, 1:] & d[:, :-1], d[:, -1:]], axis=1)
        np.testing.assert_array_equal(tk[single], tq.astype(np.float32)[single])
        assert np.all(d) == (method == "empirical")
        knots[method] = pk
    # with C = 20 the estimators differ enough to matter
    assert np.max(np.abs(knots["type8"] - knots["empirical"]) / knots["empirical"].max()) > 1e-2


def _runs_mid(pk_row, value):
    """Middle level of the grid indices where pk_row == value, from np.quantile directly."""
    idx = np.flatnonzero(pk_row == value)
    assert idx.size > 1 and np.all(np.diff(idx) == 1)
    return (LEVELS[idx[0]] + LEVELS[idx[-1]]) / 2, idx


@pytest.mark.parametrize("method", sorted(METHODS))
def test_mid_rank_tie_rule(method):
    rng = np.random.default_rng(1)
    # latent 0: 70% of the predictions are exactly 0.0; latent 1: the maximum repeated 10 times
    zeros = np.concatenate([np.zeros(70), rng.uniform(0.1, 3.0, 30)])
    capped = np.concatenate([np.full(10, 5.0), rng.uniform(0.0, 4.9, 90)])
    calib = np.stack([rng.permutation(zeros), rng.permutation(capped)], axis=1)
    true = [rng.exponential(1.0, 20000), rng.exponential(2.0, 20000)]
    tq = np.stack([true_quantiles(t, t.size, LEVELS, method) for t in true])
    pk, tk = fit_quantile_map(calib, tq, LEVELS, method)
    assert np.all(np.diff(pk, axis=1) >= 0) and np.all(np.diff(tk, axis=1) >= 0)

    raw = np.quantile(calib, LEVELS, axis=0, method=METHODS[method]).T
    mid0, idx0 = _runs_mid(raw[0], 0.0)
    assert abs(mid0 - 0.35) < 0.01
    want0 = np.interp(mid0, LEVELS, tq[0])
    np.testing.assert_allclose(tk[0, idx0], want0, rtol=1e-6)
    # ... and about the true 35% quantile, not the 0% one
    np.testing.assert_allclose(want0, np.quantile(true[0], 0.35), rtol=0.02)
    mid1, idx1 = _runs_mid(raw[1], 5.0)
    assert idx1[-1] == LEVELS.size - 1 and abs(mid1 - 0.95) < 0.01
    want1 = np.interp(mid1, LEVELS, tq[1])
    np.testing.assert_allclose(tk[1, idx1], want1, rtol=1e-6)

    out = _map(pk, tk, [[0.0, 5.0], [0.0, 7.0], [-1.0, 5.0]])
    np.testing.assert_allclose(out[:, 0], [want0, want0, want0], rtol=1e-6)
    np.testing.assert_allclose(out[:, 1], [want1, want1, want1], rtol=1e-6)
    # just above the tied value the map is continuous from the right: it leaves the run's value
    assert _map(pk, tk, [[1e-4, 4.9]])[0, 0] >= want0


def test_apply_jit_matches_numpy():
    rng = np.random.default_rng(2)
    n_lat, n_grid = 7, 30
    pk = np.sort(np.round(rng.uniform(0, 5, (n_lat, n_grid)), 1), axis=1).astype(np.float32)
    tk = np.empty_like(pk)
    for j in range(n_lat):  # a function of x: duplicate x knots share one y
        uniq, inv = np.unique(pk[j], return_inverse=True)
        tk[j] = np.sort(rng.exponential(1.0, uniq.size))[inv]
    assert any(np.any(np.diff(r) == 0) for r in pk)
    preds = rng.uniform(-1, 6, (500, n_lat)).astype(np.float32)
    preds[:n_grid] = pk.T  # exactly on the knots, duplicates included
    got = apply_quantile_map(pk, tk, preds)
    assert isinstance(got, jax.Array) and got.shape == preds.shape
    want = apply_quantile_map_numpy(pk, tk, preds)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(got)[preds < pk[:, 0]] == np.broadcast_to(tk[:, 0], preds.shape)[preds < pk[:, 0]])
    n_cached = apply_quantile_map._cache_size()
    apply_quantile_map(pk, tk, preds + 1)  # same shapes: no retrace
    assert apply_quantile_map._cache_size() == n_cached


@pytest.mark.parametrize("method", sorted(METHODS))
def test_map_recovers_true_distribution(method):
    rng = np.random.default_rng(3)
    true = rng.gamma(2.0, 1.5, 200000)
    # predictions: a monotone distortion of draws from the same distribution
    distort = lambda x: np.sqrt(x) * 10 + 3  # noqa: E731
    calib = distort(rng.gamma(2.0, 1.5, (2000, 1)))
    tq = true_quantiles(true, true.size, LEVELS, method)[None]
    pk, tk = fit_quantile_map(calib, tq, LEVELS, method)
    fresh = distort(rng.gamma(2.0, 1.5, (20000, 1)))
    mapped = _map(pk, tk, fresh)[:, 0]
    qs = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(np.quantile(mapped, qs), np.quantile(true, qs), rtol=0.08)
    grid = np.linspace(fresh.min() - 1, fresh.max() + 1, 5000, dtype=np.float32)[:, None]
    assert np.all(np.diff(_map(pk, tk, grid)[:, 0]) >= 0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_percent_latent_maps_low_predictions_to_zero(method):
    rng = np.random.default_rng(4)
    n_total = 100000
    # fires on just under 1% of tokens, so the true quantile at level 0.99 is exactly 0
    nonzero = rng.exponential(2.0, 999) + 0.05
    tq = true_quantiles(nonzero, n_total, LEVELS, method)[None]
    calib = rng.lognormal(0.0, 1.0, (1000, 1))
    pk, tk = fit_quantile_map(calib, tq, LEVELS, method)
    cut = np.quantile(calib[:, 0], 0.99, method=METHODS[method])
    fresh = rng.lognormal(0.0, 1.0, (50000, 1))
    mapped = _map(pk, tk, fresh)[:, 0]
    assert np.all(mapped[fresh[:, 0] <= cut * (1 - 1e-6)] == 0.0)
    assert np.all(mapped[fresh[:, 0] > np.quantile(calib, 0.995)] > 0)
    assert 0.003 < np.mean(mapped > 0) < 0.02


def test_fit_errors():
    rng = np.random.default_rng(5)
    calib = rng.uniform(size=(10, 4))
    tq = _true_q(rng, 4)
    calib[3, 2] = np.nan
    calib[7, 3] = np.nan
    with pytest.raises(UserError, match="latent 2 contain NaN"):
        fit_quantile_map(calib, tq, LEVELS, "empirical")
    with pytest.raises(UserError, match="latent 0 has 1 calibration"):
        fit_quantile_map(rng.uniform(size=(1, 4)), tq, LEVELS, "type8")
    with pytest.raises(UserError, match="shape"):
        fit_quantile_map(rng.uniform(size=(10, 3)), tq, LEVELS, "type8")
    bad = tq.copy()
    bad[1, 150] = bad[1, 149] - 1.0
    with pytest.raises(UserError, match="true_knots of latent 1 decrease at grid index 150"):
        fit_quantile_map(rng.uniform(size=(10, 4)), bad, LEVELS, "type8")


def test_check_monotone_messages():
    pk = np.tile(np.linspace(0, 1, 20, dtype=np.float32), (9, 1))
    tk = pk * 3
    check_monotone(pk, tk, "x")
    bad = pk.copy()
    bad[7, 12] = -1.0
    with pytest.raises(UserError) as e:
        check_monotone(bad, tk, "runs/x/calibrate/quantile_map.npz")
    msg = str(e.value)
    assert msg == ("runs/x/calibrate/quantile_map.npz: pred_knots of latent 7 decrease at grid index 12 "
                   "(a quantile grid must be non-decreasing)")
    assert "\n" not in msg
    badt = tk.copy()
    badt[4, 3] = np.nan
    with pytest.raises(UserError, match="where: true_knots of latent 4 contain NaN"):
        check_monotone(bad, badt, "where")  # latent 4 comes before latent 7
    with pytest.raises(UserError, match="same shape"):
        check_monotone(pk, tk[:, :5], "where")


def test_save_load_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(6)
    calib = rng.uniform(size=(30, 5))
    pk, tk = fit_quantile_map(calib, _true_q(rng, 5), LEVELS, "type8")
    latents = np.array([3, 17, 256, 1000, 4095])
    meta = {"method": "type8", "n_contexts": 30, "run": "x"}
    path = tmp_path / "quantile_map.npz"
    save_quantile_map(path, LEVELS, pk, tk, latents, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quantile_map.npz"]  # no temp left over
    got = load_quantile_map(path)
    np.testing.assert_array_equal(got["levels"], LEVELS)
    np.testing.assert_array_equal(got["pred_knots"], pk)
    np.testing.assert_array_equal(got["true_knots"], tk)
    np.testing.assert_array_equal(got["latents"], latents)
    assert got["meta"] == meta
    save_quantile_map(path, LEVELS, pk, tk * 2, latents, meta)  # overwrite in place
    np.testing.assert_array_equal(load_quantile_map(path)["true_knots"], tk * 2)

    missing = tmp_path / "nope" / "quantile_map.npz"
    with pytest.raises(UserError, match=str(missing)):
        load_quantile_map(missing)
    junk = tmp_path / "junk.npz"
    junk.write_text("not a zip")
    with pytest.raises(UserError, match="cannot read"):
        load_quantile_map(junk)
    partial = tmp_path / "partial.npz"
    np.savez(partial, levels=LEVELS, pred_knots=pk)
    with pytest.raises(UserError, match="missing array"):
        load_quantile_map(partial)
    bad = tmp_path / "bad.npz"
    badpk = pk.copy()
    badpk[2, 40] = badpk[2, 39] - 1
    np.savez(bad, levels=LEVELS, pred_knots=badpk, true_knots=tk, latents=latents,
             meta=np.array(json.dumps(meta)))
    with pytest.raises(UserError) as e:
        load_quantile_map(bad)
    assert str(bad) in str(e.value) and "latent 2" in str(e.value)
    unsorted = tmp_path / "unsorted.npz"
    np.savez(unsorted, levels=LEVELS[::-1], pred_knots=pk, true_knots=tk, latents=latents,
             meta=np.array(json.dumps(meta)))
    with pytest.raises(UserError, match="strictly increasing"):
        load_quantile_map(unsorted)
