"""Calibrations fit on (raw prediction, true activation) pairs: "isotonic" (scikit-learn's
IsotonicRegression, clipped) and "abstain" (isotonic, 0 below a balanced-accuracy threshold), with
the map pooled over latents for latents with too few firing pairs; stored and applied as the
quantile maps are (nlrw_jax.rewrite.quantile)."""

import typing

import numpy as np
import pytest

from nlrw_jax.config import CalibrateConfig, load_config
from nlrw_jax.errors import UserError
from nlrw_jax.rewrite import calibrate as C
from nlrw_jax.rewrite import quantile as Q


def apply_saved(tmp_path, m: dict, raw: np.ndarray, meta=None) -> np.ndarray:
    """The map through its .npz file and `normalised_values` (jitted jnp.interp), as `nlrw evaluate` applies it."""
    latents = np.arange(raw.shape[1]) * 7 + 3
    path = tmp_path / "map.npz"
    Q.save_quantile_map(path, m["levels"], m["pred_knots"], m["true_knots"], latents, meta or {})
    return C.normalised_values(path, np.asarray(raw, np.float32), latents, np.ones(raw.shape[1], bool))


def test_calibrations_list_matches_the_config_enum():
    hints = typing.get_type_hints(CalibrateConfig)
    assert set(typing.get_args(hints["estimator"])) == set(C.CALIBRATIONS)
    assert C.CALIBRATIONS == ("empirical", "type8", "isotonic", "abstain")


def test_config_accepts_paired_estimators():
    # (calibrate.min_nonzero < 1 and unknown estimators: tests/test_config_checks.py)
    for est in ("isotonic", "abstain"):
        assert load_config("configs/tiny.yaml", [f"calibrate.estimator={est}"]).calibrate.estimator == est
    assert load_config("configs/tiny.yaml", []).calibrate.min_nonzero == 3


def test_isotonic_equals_sklearn_with_ties_and_clipping(tmp_path):
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(0)
    n_ctx, n_lat = 300, 5
    max_act = np.array([1.0, 2.5, 4.0, 0.7, 3.0])
    # ratings on a coarse grid (many ties), true activations sparse and loosely increasing in them
    rating = rng.integers(0, 19, (n_ctx, n_lat)) / 2.0
    raw = (rating / 9.0 * max_act).astype(np.float32)
    fires = rng.random((n_ctx, n_lat)) < 0.1 + 0.08 * rating
    true = np.where(fires, rng.gamma(2.0, 0.3, (n_ctx, n_lat)) * (0.3 + rating / 9.0) * max_act, 0.0)
    true = true.astype(np.float32)
    m = C.fit_paired_map("isotonic", raw, true, max_act, min_nonzero=3)
    assert not m["fallback"].any()
    # queries: every calibration value, values between them, and beyond both ends (clipped)
    query = np.concatenate([raw, rng.uniform(-1.0, 1.2, (50, n_lat)) * max_act * 1.5]).astype(np.float32)
    got = apply_saved(tmp_path, m, query)
    for j in range(n_lat):
        ref = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(raw[:, j].astype(np.float64),
                                                                           true[:, j].astype(np.float64))
        want = ref.predict(query[:, j].astype(np.float64))
        np.testing.assert_allclose(got[:, j], want, rtol=1e-5, atol=1e-6 * max_act[j])
        # flat blocks keep only their ends: far fewer knots than distinct predictions
        xk, _ = C.isotonic_knots(raw[:, j], true[:, j])
        assert len(xk) == len(ref.X_thresholds_) <= len(np.unique(raw[:, j]))
    assert m["pred_knots"].shape[1] == max(len(C.isotonic_knots(raw[:, j], true[:, j])[0]) for j in range(n_lat))


def test_padded_and_repeated_knots_apply_as_the_map():
    """jnp.interp with repeated x knots (the padding, a one-knot map) gives the knots' own y."""
    pk, tk = C.pad_knots([(np.array([1.0]), np.array([0.5])), (np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0, 3.0]))])
    assert pk.shape == (2, 3) and list(pk[0]) == [1.0, 1.0, 1.0] and list(tk[0]) == [0.5, 0.5, 0.5]
    x = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [5.0, 1.5]], np.float32)
    got = np.asarray(Q.apply_quantile_map(pk, tk, x))
    np.testing.assert_allclose(got, [[0.5, 0.0], [0.5, 1.0], [0.5, 3.0], [0.5, 2.0]])


def small_case():
    """3 latents x 4 contexts. Latent 0 fires 3 times (its own map); latent 1 never fires and
    latent 2 once: both < min_nonzero=3, so both use the pooled map. In units of max activation
    the pooled pairs are x=0: y 0,0,0,0; x=0.5: y 0.2,0.4,0,0; x=1: y 0.9,0,0,0.5; averaged over
    the ties: (0, 0), (0.5, 0.15), (1, 0.35), already non-decreasing."""
    max_act = np.array([1.0, 2.0, 4.0])
    raw = np.array([[0.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.5, 2.0, 2.0], [1.0, 2.0, 4.0]], np.float32)
    true = np.array([[0.0, 0.0, 0.0], [0.2, 0.0, 0.0], [0.4, 0.0, 0.0], [0.9, 0.0, 2.0]], np.float32)
    return raw, true, max_act


def test_pooled_fallback_by_hand(tmp_path):
    raw, true, max_act = small_case()
    m = C.fit_paired_map("isotonic", raw, true, max_act, min_nonzero=3)
    assert list(m["fallback"]) == [False, True, True] and not m["pooled_all_zero"]
    query = np.array([[0.25, 1.5, 1.0], [0.75, 3.0, 3.0], [2.0, 10.0, 8.0]], np.float32)
    got = apply_saved(tmp_path, m, query)
    # latent 0 own: (0,0),(0.5,0.3),(1,0.9); latent 1 pooled x2: (0,0),(1,0.3),(2,0.7);
    # latent 2 pooled x4: (0,0),(2,0.6),(4,1.4)
    want = [[0.15, 0.5, 0.3], [0.6, 0.7, 1.0], [0.9, 0.7, 1.4]]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # the pool leaves out latents outside `pool` (the stage passes the explained ones)
    m2 = C.fit_paired_map("isotonic", raw, true, max_act, min_nonzero=3, pool=np.array([False, True, True]))
    # pooled from latents 1 and 2 only: (0, 0), (0.5, 0), (1, 1/6); latent 1 x2: (0, 0), (1, 0), (2, 1/3)
    np.testing.assert_allclose(apply_saved(tmp_path, m2, query)[:, 1], [1 / 6, 1 / 3, 1 / 3], rtol=1e-6)


def test_no_firing_pair_anywhere_maps_to_zero_without_crashing(tmp_path):
    raw, _, max_act = small_case()
    for method in C.PAIRED:
        m = C.fit_paired_map(method, raw, np.zeros_like(raw), max_act, min_nonzero=1)
        assert m["fallback"].all() and m["pooled_all_zero"]
        assert (apply_saved(tmp_path, m, np.array([[0.0, 1.0, 9.0]], np.float32)) == 0).all()


def test_abstain_threshold_by_hand():
    x = np.array([0.0, 0.1, 0.2, 0.3, 0.5, 0.8])
    fires = np.array([False, False, True, False, True, True])
    # balanced accuracy: t=0 .5, 0.1 .667, 0.2 .833, 0.3 .667, 0.5 .833, 0.8 .667, inf .5: a tie, the smallest wins
    assert C.abstain_threshold(x, fires) == 0.2
    assert C.abstain_threshold(x, np.zeros(6, bool)) == 0.0  # no firing pair: every candidate ties
    assert C.abstain_threshold(x, x > 0.25) == 0.3  # separable: the smallest perfect threshold


def test_abstain_map_is_zero_below_the_threshold(tmp_path):
    # one latent: unique x 0, .1 (twice), .2, .3, .5, .8 with y 0 | 0, .6 | 1 | 0 | 2 | 3.
    # Scores tp * n_neg + tn * n_pos (4 firing, 3 silent): t=0 12, .1 16, .2 17, .3 14, .5 18, .8 15,
    # inf 12 -> t = 0.5. Isotonic: 0, .3, .5, .5, 2, 3 at the unique x.
    x = np.array([0.0, 0.1, 0.1, 0.2, 0.3, 0.5, 0.8], np.float32)[:, None]
    y = np.array([0.0, 0.0, 0.6, 1.0, 0.0, 2.0, 3.0], np.float32)[:, None]
    iso = C.fit_paired_map("isotonic", x, y, np.array([1.0]), min_nonzero=3)
    ab = C.fit_paired_map("abstain", x, y, np.array([1.0]), min_nonzero=3)
    assert ab["thresholds"][0] == pytest.approx(0.5) and not ab["fallback"][0]
    query = np.array([0.1, 0.3, np.nextafter(np.float32(0.5), np.float32(0)), 0.5, 0.65, 1.0], np.float32)[:, None]
    np.testing.assert_allclose(apply_saved(tmp_path, iso, query)[:, 0], [0.3, 0.5, 2.0, 2.0, 2.5, 3.0], rtol=1e-5)
    np.testing.assert_allclose(apply_saved(tmp_path, ab, query)[:, 0], [0.0, 0.0, 0.0, 2.0, 2.5, 3.0], rtol=1e-5)


def test_abstain_fallback_uses_the_pooled_threshold(tmp_path):
    raw, true, max_act = small_case()
    m = C.fit_paired_map("abstain", raw, true, max_act, min_nonzero=3)
    # pooled, relative: x 0 (4 silent), 0.5 (2 firing, 2 silent), 1 (2 firing, 2 silent): n_pos 4, n_neg 8;
    # t=0: 4*8 = 32, t=0.5: 4*8 + 4*4 = 48, t=1: 2*8 + 6*4 = 40, inf: 8*4 = 32 -> 0.5
    assert m["pooled_threshold"] == 0.5
    np.testing.assert_allclose(m["thresholds"][1:], [1.0, 2.0])
    # latent 0 own: x 0 silent, 0.5 two firing, 1 firing -> t = 0.5 (perfect)
    assert m["thresholds"][0] == 0.5
    query = np.array([[0.4, 0.9, 1.9], [0.5, 1.0, 2.0], [0.75, 1.5, 3.0]], np.float32)
    np.testing.assert_allclose(apply_saved(tmp_path, m, query), [[0.0, 0.0, 0.0], [0.3, 0.3, 0.6], [0.6, 0.5, 1.0]],
                               rtol=1e-6)


def test_bad_pairs_are_refused():
    with pytest.raises(UserError, match="latent 1 are not all finite"):
        C.fit_paired_map("isotonic", np.array([[0.0, np.nan]]), np.zeros((1, 2)), np.ones(2), 3)
    with pytest.raises(UserError, match="must be \\[contexts, latents\\]"):
        C.fit_paired_map("isotonic", np.zeros((3, 2)), np.zeros((3, 3)), np.ones(2), 3)
    with pytest.raises(UserError, match="unknown paired calibration 'type8'"):
        C.fit_paired_map("type8", np.zeros((3, 2)), np.zeros((3, 2)), np.ones(2), 3)


def test_report_sweep_table_shows_the_pooled_fallback_count():
    from nlrw_jax.report.markdown import sweep_table

    row = {"pooled_specificity": 0.9, "pooled_sensitivity": 0.5, "ce_top_all": 4.2, "kl_top_all": 0.1}
    res = {"estimator": "isotonic", "calibration_contexts": 8, "calibration_sweep": [
        {"variant": "raw", **row, "pooled_fallback": None}, {"variant": "normalised", **row, "pooled_fallback": 2},
        {"variant": "normalised:type8:4", **row}]}  # results.json from before the column: no key
    md = "\n".join(sweep_table(res, plotted=False))
    assert "| variant | estimator | calibration contexts | pooled specificity | pooled sensitivity | CE (top, all) " \
           "| pooled fallback |" in md
    assert "| normalised | isotonic | 8 | 0.900 | 0.500 | 4.2000 | 2 |" in md
    assert "| raw | — | — | 0.900 | 0.500 | 4.2000 | — |" in md and "| normalised:type8:4 | type8 | 4 |" in md
