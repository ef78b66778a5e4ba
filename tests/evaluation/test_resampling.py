"""medtransfer.evaluation.resampling: bootstrap intervals and bands checked against
straightforward per-resample loops over scikit-learn curves, DeLong against the
pairwise definition, coverage against a known true AUC."""

from __future__ import annotations

import inspect
import json
import math
import time

import numpy as np
import pytest
from scipy.stats import norm
from sklearn import metrics as skm

from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation.metrics import binary_metrics, pr_curve_points, roc_curve_points
from medtransfer.evaluation.resampling import (
    bootstrap_ci,
    delong_test,
    paired_bootstrap_auc_test,
    pr_band,
    roc_band,
)

TOL = 1e-6

# ---------------------------------------------------------------------- bootstrap


def _binormal(rng, n_pos, n_neg, mu):
    scores = np.concatenate([rng.normal(mu, 1, n_pos), rng.normal(0, 1, n_neg)])
    return np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)], scores


def test_bootstrap_ci_covers_true_auc_at_nominal_rate():
    true_auc = 0.8
    # Phi^-1(0.8) = 0.8416212335729143; binormal AUC = Phi(mu / sqrt(2))
    mu = math.sqrt(2) * 0.8416212335729143
    assert 0.5 * math.erfc(-mu / 2) == pytest.approx(true_auc, abs=1e-9)
    rng = np.random.default_rng(2024)
    covered = 0
    n_sim = 200
    for i in range(n_sim):
        y, s = _binormal(rng, 100, 100, mu)
        ci = bootstrap_ci(y, s, threshold=0.5, n_resamples=300, seed=i)["auc_ci"]
        covered += ci[0] <= true_auc <= ci[1]
    assert 0.90 <= covered / n_sim <= 0.99


def test_grouped_bootstrap_resamples_whole_patients():
    rng = np.random.default_rng(7)
    y_pat, s_pat = _binormal(rng, 60, 90, 1.0)
    # each patient contributes two identical images, stored next to each other
    y_img, s_img = np.repeat(y_pat, 2), np.repeat(s_pat, 2)
    patients = np.repeat([f"patient{i:03d}" for i in range(y_pat.size)], 2)
    grouped = bootstrap_ci(y_img, s_img, threshold=0.5, groups=patients, n_resamples=500, seed=3)
    naive = bootstrap_ci(y_img, s_img, threshold=0.5, n_resamples=500, seed=3)
    per_patient = bootstrap_ci(y_pat, s_pat, threshold=0.5, n_resamples=500, seed=3)
    # duplicating whole patients changes no ratio metric: identical to one image per patient
    for key in ("auc_ci", "accuracy_ci", "sensitivity_ci", "specificity_ci", "f1_ci"):
        np.testing.assert_allclose(grouped[key], per_patient[key], atol=1e-12)
    width = lambda r: r["auc_ci"][1] - r["auc_ci"][0]  # noqa: E731
    assert width(grouped) > 1.2 * width(naive)
    assert grouped["n_groups"] == y_pat.size and naive["n_groups"] == y_img.size


def test_bootstrap_ci_with_single_class_resamples_is_finite():
    y = np.array([1, 0, 0, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    r = bootstrap_ci(y, p, threshold=0.5, n_resamples=400, seed=1)
    for key, value in r.items():
        if key.endswith("_ci"):
            assert all(math.isfinite(v) for v in value), key
            assert value[0] <= value[1]
    assert r["n_valid"]["accuracy"] == r["n_valid"]["specificity"] == 400
    assert 0 < r["n_valid"]["auc"] < 400  # ~1/e of resamples lack the positive
    assert r["n_valid"]["sensitivity"] == r["n_valid"]["auc"]
    json.dumps(r)


def test_bootstrap_ci_is_deterministic_and_brackets_point_estimate(scored):
    y, p = scored("continuous")
    a = bootstrap_ci(y, p, threshold=0.5, n_resamples=500, seed=11)
    b = bootstrap_ci(y, p, threshold=0.5, n_resamples=500, seed=11)
    assert a == b
    point = binary_metrics(y, p, threshold=0.5)
    for m in ("auc", "average_precision", "accuracy", "sensitivity", "specificity", "precision", "npv", "f1"):
        lo, hi = a[f"{m}_ci"]
        assert lo <= point[m] <= hi, m


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"n_resamples": 0}, ConfigError, "n_resamples"),
        ({"confidence": 1.5}, ConfigError, "confidence"),
        ({"groups": ["a", "b"]}, DataError, "groups"),
    ],
)
def test_bootstrap_ci_rejects_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        bootstrap_ci([0, 1, 0], [0.1, 0.8, 0.3], threshold=0.5, **kwargs)


def test_bootstrap_ci_needs_both_classes():
    with pytest.raises(DataError, match="only class 0"):
        bootstrap_ci([0, 0, 0], [0.1, 0.8, 0.3], threshold=0.5)


def test_bootstrap_ci_is_fast():
    rng = np.random.default_rng(0)
    y, s = _binormal(rng, 400, 600, 1.0)
    start = time.perf_counter()
    bootstrap_ci(y, s, threshold=0.5, n_resamples=2000)
    assert time.perf_counter() - start < 2.0


# ------------------------------------------------------------------- paired tests


def test_paired_bootstrap_detects_informative_vs_random():
    rng = np.random.default_rng(5)
    y, good = _binormal(rng, 100, 100, 1.5)
    random = rng.random(200)
    r = paired_bootstrap_auc_test(y, good, random, n_resamples=1000)
    assert r["auc_diff"] == pytest.approx(r["auc_a"] - r["auc_b"])
    assert r["auc_a"] == pytest.approx(skm.roc_auc_score(y, good), abs=TOL)
    assert r["auc_diff"] > 0 and r["ci"][0] > 0 and r["p_value"] < 0.01
    swapped = paired_bootstrap_auc_test(y, random, good, n_resamples=1000)
    assert swapped["auc_diff"] < 0 and swapped["ci"][1] < 0 and swapped["p_value"] < 0.01


def test_paired_bootstrap_equal_quality_is_not_significant():
    rng = np.random.default_rng(9)
    y, latent = _binormal(rng, 100, 100, 1.0)
    a = latent + rng.normal(0, 1, 200)
    b = latent + rng.normal(0, 1, 200)
    r = paired_bootstrap_auc_test(y, a, b, n_resamples=1000)
    assert r["p_value"] > 0.05 and r["ci"][0] < 0 < r["ci"][1]
    same = paired_bootstrap_auc_test(y, a, a, n_resamples=200)
    assert same["auc_diff"] == 0.0 and same["p_value"] == 1.0


def test_delong_agrees_with_bootstrap_and_sklearn():
    rng = np.random.default_rng(12)
    y, latent = _binormal(rng, 150, 150, 1.2)
    a = latent + rng.normal(0, 0.5, 300)
    b = latent + rng.normal(0, 1.0, 300)
    d = delong_test(y, a, b)
    assert d["auc_a"] == pytest.approx(skm.roc_auc_score(y, a), abs=TOL)
    assert d["auc_b"] == pytest.approx(skm.roc_auc_score(y, b), abs=TOL)
    assert d["auc_diff"] > 0 and d["z"] > 0
    boot = paired_bootstrap_auc_test(y, a, b, n_resamples=2000)
    se_boot = (boot["ci"][1] - boot["ci"][0]) / (2 * 1.959964)
    se_delong = d["auc_diff"] / d["z"]
    assert 0.7 < se_delong / se_boot < 1.4
    assert (d["p_value"] < 0.05) == (boot["p_value"] < 0.05)
    same = delong_test(y, a, a)
    assert same["auc_diff"] == 0.0 and same["z"] == 0.0 and same["p_value"] == 1.0


def test_delong_ties_match_sklearn_auc(scored):
    y, p = scored("ties")
    d = delong_test(y, p, np.round(p * 0.5, 1))
    assert d["auc_a"] == pytest.approx(skm.roc_auc_score(y, p), abs=TOL)
    assert math.isfinite(d["z"]) and 0 <= d["p_value"] <= 1


# ------------------------------------------------------------------------ ROC band


def test_roc_band_brackets_the_observed_curve(scored):
    y, p = scored("continuous")
    grid, lo, hi = roc_band(y, p, n_resamples=200, seed=0)
    assert grid.shape == lo.shape == hi.shape == (101,)
    assert grid[0] == 0.0 and grid[-1] == 1.0
    assert np.all(lo <= hi) and np.all(lo >= 0) and np.all(hi <= 1)
    assert hi[-1] == 1.0
    fpr, tpr, _ = roc_curve_points(y, p)
    observed = np.interp(grid[1:-1], fpr, tpr)  # interior grid, no vertical-jump ambiguity
    inside = (observed >= lo[1:-1] - 1e-9) & (observed <= hi[1:-1] + 1e-9)
    assert inside.mean() > 0.95


def test_roc_band_groups_widen_band():
    rng = np.random.default_rng(4)
    y_pat, s_pat = _binormal(rng, 50, 50, 1.0)
    y, s = np.repeat(y_pat, 3), np.repeat(s_pat, 3)
    groups = np.repeat(np.arange(100), 3)
    _, lo_g, hi_g = roc_band(y, s, groups=groups, n_resamples=200)
    _, lo_n, hi_n = roc_band(y, s, groups=None, n_resamples=200)
    assert (hi_g - lo_g).mean() > 1.3 * (hi_n - lo_n).mean()


def test_pr_band_brackets_the_curve_and_narrows_with_more_data():
    def data(n, seed):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, n)
        return y, 1 / (1 + np.exp(-(2 * y - 1) * 1.5 - rng.normal(0, 1, n)))

    y, p = data(200, 0)
    grid, lo, hi = pr_band(y, p, n_resamples=200, seed=0)
    precision, recall, _ = pr_curve_points(y, p)
    best = np.maximum.accumulate(precision)
    order = np.argsort(recall, kind="stable")
    curve = np.interp(grid, recall[order], best[order])
    inside = (lo - 1e-9 <= curve) & (curve <= hi + 1e-9)
    assert inside[5:-5].mean() > 0.9 and np.all(lo <= hi)
    _, lo_big, hi_big = pr_band(*data(2000, 1), n_resamples=200, seed=0)
    assert (hi_big - lo_big)[10:90].mean() < (hi - lo)[10:90].mean()



# ----------------------------------------------------- bands against loop references


def _clustered_data(seed: int, n_patients: int = 61):
    """Tied scores (0.05 grid), one to three images per patient, an odd patient count."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 4, n_patients)
    y_pat = rng.integers(0, 2, n_patients)
    y = np.repeat(y_pat, sizes)
    p = np.round(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1) * 20) / 20
    groups = np.repeat([f"patient{i}" for i in rng.permutation(n_patients)], sizes)
    return y, p, groups


def _resampled_indices(groups, n_resamples: int, seed: int):
    """Sample indices of each cluster-bootstrap resample, drawn as the module draws them:
    clusters numbered by first appearance, one (n_resamples, n_clusters) draw."""
    assert n_resamples <= 256  # the module draws up to 256 resamples in one call
    number: dict = {}
    cluster = np.array([number.setdefault(g, len(number)) for g in groups])
    members = [np.flatnonzero(cluster == c) for c in range(len(number))]
    draws = np.random.default_rng(seed).integers(0, len(number), size=(n_resamples, len(number)))
    return [np.concatenate([members[c] for c in row]) for row in draws]


def _loop_band(y, p, groups, read_curve, *, n_resamples=150, seed=3, confidence=0.95):
    grid = np.linspace(0, 1, 101)
    rows = []
    for drawn in _resampled_indices(groups, n_resamples, seed):
        if y[drawn].min() == y[drawn].max():
            continue  # a single class: no curve
        rows.append(read_curve(y[drawn], p[drawn], grid))
    alpha = 1 - confidence
    lo, hi = np.quantile(np.vstack(rows), [alpha / 2, 1 - alpha / 2], axis=0)
    return grid, lo, hi


def _roc_on_grid(y, p, grid):
    fpr, tpr, _ = skm.roc_curve(y, p, drop_intermediate=False)
    out = []
    for g in grid:
        j = np.searchsorted(fpr, g, side="right") - 1  # last point at or left of g
        if fpr[j] == g:
            out.append(tpr[j])  # top of a vertical segment
        else:
            out.append(tpr[j] + (g - fpr[j]) / (fpr[j + 1] - fpr[j]) * (tpr[j + 1] - tpr[j]))
    return np.array(out)


def _pr_on_grid(y, p, grid):
    precision, recall, _ = skm.precision_recall_curve(y, p)
    best = np.maximum.accumulate(precision)  # best precision at recall >= r
    order = np.argsort(recall, kind="stable")
    return np.interp(grid, recall[order], best[order])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("band, read_curve", [(roc_band, _roc_on_grid), (pr_band, _pr_on_grid)])
def test_vectorised_band_equals_per_resample_loop(seed, band, read_curve):
    y, p, groups = _clustered_data(seed)
    expected = _loop_band(y, p, groups, read_curve)
    got = band(y, p, groups=groups, n_resamples=150, seed=3)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_bands_without_groups_resample_images():
    y, p, _ = _clustered_data(5)
    images = np.arange(y.shape[0])
    for band in (roc_band, pr_band):
        for a, b in zip(band(y, p, n_resamples=100, seed=1), band(y, p, groups=images, n_resamples=100, seed=1)):
            np.testing.assert_array_equal(a, b)


def test_bands_reject_bad_options():
    y, p, _ = _clustered_data(0)
    with pytest.raises(ConfigError, match="grid_size"):
        pr_band(y, p, grid_size=1)
    with pytest.raises(ConfigError, match="n_resamples"):
        roc_band(y, p, n_resamples=0)
    with pytest.raises(DataError, match="only class 1"):
        pr_band(np.ones(4, int), [0.1, 0.2, 0.3, 0.4])


def test_pr_band_is_fast():
    rng = np.random.default_rng(0)
    y, s = _binormal(rng, 400, 600, 1.0)
    start = time.perf_counter()
    pr_band(y, s, n_resamples=200)
    assert time.perf_counter() - start < 2.0


# ----------------------------------------------------------- DeLong by definition


def _delong_by_definition(y, a, b):
    """DeLong et al. 1988 written out with the m x n pairwise kernel."""
    components = []
    for s in (a, b):
        pos, neg = s[y == 1][:, None], s[y == 0][None, :]
        kernel = (pos > neg) + 0.5 * (pos == neg)
        components.append((kernel.mean(), kernel.mean(axis=1), kernel.mean(axis=0)))
    m, n = int(y.sum()), int((1 - y).sum())
    s10 = np.cov([c[1] for c in components])
    s01 = np.cov([c[2] for c in components])
    cov = s10 / m + s01 / n
    z = (components[0][0] - components[1][0]) / math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return components[0][0], components[1][0], z, 2 * norm.sf(abs(z))


@pytest.mark.parametrize("seed", [0, 1])
def test_delong_equals_the_pairwise_definition(seed):
    y, p, _ = _clustered_data(seed)  # tied scores
    other = np.round(p + np.random.default_rng(seed).normal(0, 0.15, p.shape[0]), 1)
    auc_a, auc_b, z, p_value = _delong_by_definition(y, p, other)
    d = delong_test(y, p, other)
    assert d["auc_a"] == pytest.approx(auc_a, abs=1e-12)
    assert d["auc_b"] == pytest.approx(auc_b, abs=1e-12)
    assert d["z"] == pytest.approx(z, rel=1e-9)
    assert d["p_value"] == pytest.approx(p_value, rel=1e-9)


# ------------------------------------------------------------------ calling convention


@pytest.mark.parametrize("function", [bootstrap_ci, paired_bootstrap_auc_test, roc_band, pr_band])
def test_resampling_settings_are_keyword_only(function):
    params = inspect.signature(function).parameters
    data = [name for name, param in params.items() if param.kind is param.POSITIONAL_OR_KEYWORD]
    assert data in (["y_true", "prob_pos"], ["y_true", "prob_a", "prob_b"])
    settings = [name for name, param in params.items() if param.kind is param.KEYWORD_ONLY]
    shared = [name for name in settings if name in ("groups", "n_resamples", "confidence", "seed")]
    assert shared == ["groups", "n_resamples", "confidence", "seed"]
    with pytest.raises(TypeError):
        function(*([[0, 1, 0, 1]] + [[0.1, 0.9, 0.2, 0.8]] * (len(data) - 1)), ["a", "b", "c", "d"])
