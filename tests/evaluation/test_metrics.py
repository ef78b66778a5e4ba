"""medtransfer.evaluation.metrics, checked against scikit-learn as an independent reference."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from sklearn import metrics as skm

from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation.metrics import (
    ThresholdPolicy,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    delong_test,
    multiclass_metrics,
    paired_bootstrap_auc_test,
    parse_threshold_policy,
    pr_curve_points,
    roc_band,
    roc_curve_points,
)

TOL = 1e-6


def _dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(sum(map(ord, name)))
    if name == "continuous":
        y = rng.integers(0, 2, 300)
        p = 1 / (1 + np.exp(-(rng.normal(size=300) + 1.2 * y)))
    elif name == "ties":  # probabilities on a 0.1 grid: many positive/negative ties
        y = rng.integers(0, 2, 200)
        p = np.round(np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1), 1)
    elif name == "imbalanced":
        y = (rng.random(400) < 0.1).astype(int)
        p = np.clip(rng.beta(2, 5, 400) + 0.25 * y, 0, 1)
    elif name == "tiny":
        y = np.array([0, 0, 1, 1, 0, 1])
        p = np.array([0.1, 0.4, 0.35, 0.8, 0.8, 0.8])
    elif name == "all_tied":
        y = np.array([0, 1, 0, 1, 1])
        p = np.full(5, 0.5)
    else:  # pragma: no cover
        raise KeyError(name)
    return y.astype(int), p.astype(float)


DATASETS = ["continuous", "ties", "imbalanced", "tiny", "all_tied"]


def _thresholds(p: np.ndarray) -> list[float]:
    # fixed values plus thresholds that sit exactly on observed probabilities
    return [0.5, 0.0, 1.0, float(p[0]), float(np.median(p)), float(np.max(p)), float(np.min(p))]


# ------------------------------------------------------------------ binary metrics


@pytest.mark.parametrize("name", DATASETS)
def test_binary_metrics_match_sklearn(name):
    y, p = _dataset(name)
    for t in _thresholds(p):
        m = binary_metrics(y, p, threshold=t)
        pred = (p >= t).astype(int)
        tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
        assert m["confusion_matrix"] == [[tn, fp], [fn, tp]]
        assert m["n"] == len(y) and m["n_positive"] == int(y.sum())
        assert m["threshold"] == t
        expected = {
            "auc": skm.roc_auc_score(y, p),
            "average_precision": skm.average_precision_score(y, p),
            "accuracy": skm.accuracy_score(y, pred),
            "sensitivity": skm.recall_score(y, pred, pos_label=1, zero_division=0),
            "specificity": skm.recall_score(y, pred, pos_label=0, zero_division=0),
            "precision": skm.precision_score(y, pred, pos_label=1, zero_division=0),
            "npv": skm.precision_score(y, pred, pos_label=0, zero_division=0),
            "f1": skm.f1_score(y, pred, zero_division=0),
        }
        for key, value in expected.items():
            assert m[key] == pytest.approx(value, abs=TOL), (name, t, key)


def test_binary_metrics_is_json_ready_without_numpy_types():
    y, p = _dataset("continuous")
    m = binary_metrics(np.asarray(y, dtype=np.int32), p.astype(np.float32), threshold=np.float64(0.5))
    assert json.loads(json.dumps(m)) == m

    def walk(v):
        if isinstance(v, list):
            return all(walk(x) for x in v)
        return type(v) in (int, float)

    assert all(walk(v) for v in m.values())


def test_undefined_ratios_are_zero_not_nan():
    y = np.array([0, 1, 0, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4])
    nothing_positive = binary_metrics(y, p, threshold=0.9)
    assert nothing_positive["precision"] == 0.0 and nothing_positive["f1"] == 0.0
    everything_positive = binary_metrics(y, p, threshold=0.0)
    assert everything_positive["npv"] == 0.0 and everything_positive["specificity"] == 0.0


@pytest.mark.parametrize(
    "y, p, match",
    [
        ([1, 1, 1], [0.2, 0.5, 0.9], "only class 1"),
        ([0, 0], [0.2, 0.5], "only class 0"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "only 0"),
        ([0, 1], [0.1, 0.2, 0.3], "same length"),
        ([0, 1], [0.1, float("nan")], "finite"),
        ([], [], "empty"),
    ],
)
def test_binary_metrics_rejects_bad_input(y, p, match):
    with pytest.raises(DataError, match=match):
        binary_metrics(y, p, threshold=0.5)


def test_non_finite_threshold_is_a_config_error():
    with pytest.raises(ConfigError, match="threshold"):
        binary_metrics([0, 1], [0.1, 0.9], threshold=float("nan"))


@pytest.mark.parametrize("name", DATASETS)
def test_roc_curve_points_match_sklearn(name):
    y, p = _dataset(name)
    fpr, tpr, thr = roc_curve_points(y, p)
    fpr2, tpr2, thr2 = skm.roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(fpr, fpr2, atol=TOL)
    np.testing.assert_allclose(tpr, tpr2, atol=TOL)
    np.testing.assert_array_equal(thr, thr2)


@pytest.mark.parametrize("name", DATASETS)
def test_pr_curve_points_match_sklearn(name):
    y, p = _dataset(name)
    prec, rec, thr = pr_curve_points(y, p)
    prec2, rec2, thr2 = skm.precision_recall_curve(y, p)
    np.testing.assert_allclose(prec, prec2, atol=TOL)
    np.testing.assert_allclose(rec, rec2, atol=TOL)
    np.testing.assert_array_equal(thr, thr2)


# ---------------------------------------------------------------------- multiclass


@pytest.mark.parametrize("k, seed", [(2, 0), (3, 1), (4, 2)])
def test_multiclass_metrics_match_sklearn(k, seed):
    rng = np.random.default_rng(seed)
    n = 300
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    names = [f"c{i}" for i in range(k)]
    m = multiclass_metrics(y, probs, class_names=names)
    pred = probs.argmax(axis=1)
    assert m["n"] == n
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=TOL)
    if k > 2:
        ref_macro = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
    else:
        ref_macro = np.mean([skm.roc_auc_score(y == c, probs[:, c]) for c in range(k)])
    assert m["macro_auc"] == pytest.approx(ref_macro, abs=TOL)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=TOL)
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=list(range(k))).tolist()
    prec, rec, f1, support = skm.precision_recall_fscore_support(y, pred, labels=list(range(k)), zero_division=0)
    for c, name in enumerate(names):
        pc = m["per_class"][name]
        assert pc["auc"] == pytest.approx(skm.roc_auc_score(y == c, probs[:, c]), abs=TOL)
        assert pc["sensitivity"] == pytest.approx(rec[c], abs=TOL)
        assert pc["precision"] == pytest.approx(prec[c], abs=TOL)
        assert pc["f1"] == pytest.approx(f1[c], abs=TOL)
        assert pc["support"] == support[c]
    assert json.loads(json.dumps(m)) == m


def test_multiclass_metrics_errors():
    probs = np.full((4, 3), 1 / 3)
    with pytest.raises(DataError, match="'c'"):
        multiclass_metrics([0, 1, 0, 1], probs, class_names=["a", "b", "c"])
    with pytest.raises(DataError, match=r"\(n, 2\)"):
        multiclass_metrics([0, 1, 0, 1], probs, class_names=["a", "b"])
    with pytest.raises(DataError, match="0..2"):
        multiclass_metrics([0, 1, 3, 2], probs, class_names=["a", "b", "c"])
    with pytest.raises(ConfigError, match="class_names"):
        multiclass_metrics([0, 1, 0, 1], probs, class_names=["a", "a", "c"])


# --------------------------------------------------------------- threshold policies


@pytest.mark.parametrize(
    "text, kind, value, canonical",
    [
        ("youden", "youden", None, "youden"),
        ("  F1 ", "f1", None, "f1"),
        ("sensitivity:0.95", "sensitivity", 0.95, "sensitivity:0.95"),
        ("Specificity:0.9", "specificity", 0.9, "specificity:0.9"),
        ("specificity: 1", "specificity", 1.0, "specificity:1"),
        ("fixed:0.5", "fixed", 0.5, "fixed:0.5"),
        ("fixed:0", "fixed", 0.0, "fixed:0"),
    ],
)
def test_parse_threshold_policy(text, kind, value, canonical):
    policy = parse_threshold_policy(text)
    assert policy == ThresholdPolicy(kind, value)
    assert str(policy) == canonical
    assert parse_threshold_policy(str(policy)) == policy


@pytest.mark.parametrize(
    "text",
    ["", "youdens", "youden:0.5", "f1:1", "sensitivity", "sensitivity:", "sensitivity:abc",
     "sensitivity:0", "sensitivity:1.5", "specificity:-0.1", "fixed:1.2", "fixed:nan", "auc:0.9"],
)
def test_parse_threshold_policy_rejects_bad_text(text):
    with pytest.raises(ConfigError) as info:
        parse_threshold_policy(text)
    message = str(info.value)
    assert "--threshold" in message and repr(text) in message and "sensitivity:X" in message


def test_threshold_policy_validates_on_construction():
    with pytest.raises(ConfigError, match="--threshold"):
        ThresholdPolicy("sensitivity", 2.0)
    with pytest.raises(ConfigError, match="--threshold"):
        ThresholdPolicy("median")


def _brute_force_table(y, p):
    """(candidate, sensitivity, specificity, f1, youden) for every distinct probability."""
    rows = []
    for t in np.unique(p):
        pred = p >= t
        tp = np.sum(pred & (y == 1))
        fp = np.sum(pred & (y == 0))
        fn = np.sum(~pred & (y == 1))
        tn = np.sum(~pred & (y == 0))
        sens, spec = tp / (tp + fn), tn / (tn + fp)
        rows.append((float(t), sens, spec, 2 * tp / (2 * tp + fp + fn), sens + spec - 1))
    return rows


POLICY_DATASETS = ["continuous", "ties", "imbalanced", "tiny"]


@pytest.mark.parametrize("name", POLICY_DATASETS)
@pytest.mark.parametrize("objective, column", [("youden", 4), ("f1", 3)])
def test_choose_threshold_maximises_objective(name, objective, column):
    y, p = _dataset(name)
    table = _brute_force_table(y, p)
    t = choose_threshold(y, p, parse_threshold_policy(objective))
    best = max(r[column] for r in table)
    # ties go to the highest optimal candidate; t gives exactly its predictions
    top = max(r[0] for r in table if r[column] >= best - 1e-12)
    assert np.array_equal(p >= t, p >= top)
    lower = [r[0] for r in table if r[0] < top]
    assert t == top if not lower else max(lower) < t <= top


def test_youden_and_f1_thresholds_sit_midway_in_the_optimal_interval():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.05, 0.1, 0.2, 0.8, 0.9, 1.0])
    assert choose_threshold(y, p, parse_threshold_policy("youden")) == pytest.approx(0.5)
    assert choose_threshold(y, p, parse_threshold_policy("f1")) == pytest.approx(0.5)


@pytest.mark.parametrize("name", POLICY_DATASETS)
@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_choose_threshold_sensitivity_and_specificity(name, target):
    y, p = _dataset(name)
    table = _brute_force_table(y, p)
    t = choose_threshold(y, p, ThresholdPolicy("sensitivity", target))
    assert t == max(r[0] for r in table if r[1] >= target)
    assert binary_metrics(y, p, threshold=t)["sensitivity"] >= target
    feasible = [r[0] for r in table if r[2] >= target]
    if feasible:
        t = choose_threshold(y, p, ThresholdPolicy("specificity", target))
        assert t == min(feasible)
        assert binary_metrics(y, p, threshold=t)["specificity"] >= target
    else:
        with pytest.raises(DataError, match="specificity"):
            choose_threshold(y, p, ThresholdPolicy("specificity", target))


def test_choose_threshold_fixed_and_unreachable_specificity():
    assert choose_threshold([0, 1], [0.2, 0.7], parse_threshold_policy("fixed:0.3")) == 0.3
    y = [0, 0, 1, 1]
    p = [1.0, 1.0, 1.0, 0.2]  # saturated: both negatives share the top score
    with pytest.raises(DataError, match="no threshold reaches specificity 0.9"):
        choose_threshold(y, p, parse_threshold_policy("specificity:0.9"))
    with pytest.raises(DataError, match="only class 1"):
        choose_threshold([1, 1], [0.3, 0.4], parse_threshold_policy("youden"))


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


def test_bootstrap_ci_is_deterministic_and_brackets_point_estimate():
    y, p = _dataset("continuous")
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


def test_delong_ties_match_sklearn_auc():
    y, p = _dataset("ties")
    d = delong_test(y, p, np.round(p * 0.5, 1))
    assert d["auc_a"] == pytest.approx(skm.roc_auc_score(y, p), abs=TOL)
    assert math.isfinite(d["z"]) and 0 <= d["p_value"] <= 1


# ------------------------------------------------------------------------ ROC band


def test_roc_band_brackets_the_observed_curve():
    y, p = _dataset("continuous")
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
    _, lo_g, hi_g = roc_band(y, s, groups, n_resamples=200)
    _, lo_n, hi_n = roc_band(y, s, None, n_resamples=200)
    assert (hi_g - lo_g).mean() > 1.3 * (hi_n - lo_n).mean()


def test_pr_band_brackets_the_curve_and_narrows_with_more_data():
    from medtransfer.evaluation.metrics import pr_band

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
