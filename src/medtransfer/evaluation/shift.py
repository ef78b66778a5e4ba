"""How an external labelled set differs from the run's own test split: the shift summary.

A model that meets another hospital's images answers as confidently as at home, so
`evaluate` states what changed, from the outputs alone:

- prevalence: the positive share here and in the run's test split (threshold metrics such
  as precision move with it even when the model does not);
- score distribution: the two-sample Kolmogorov-Smirnov distance between the positive-class
  probabilities here and on the run's own test split (0: same distribution, 1: disjoint);
- calibration in the large and calibration slope (Cox 1958; Van Calster et al. 2016): the
  logistic recalibration model logit P(y=1) = a + b * logit(p). The slope b is fitted with
  a free intercept (1 is ideal; below 1: predictions too extreme); calibration in the large
  is the intercept a with b fixed at 1 (0 is ideal; below 0: risks overestimated).

The logistic fits are Newton-Raphson (IRLS) in numpy; both have one or two parameters.

A multi-label model gets the same summary per finding (:func:`multilabel_shift_summary`),
each on that finding's known labels only (an unknown label counts for nothing), and once
pooled over every known image-finding pair at the top level, so readers of the single-label
keys keep working.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.stats import ks_2samp

__all__ = [
    "logit", "fit_logistic", "calibration_fit", "shift_summary", "shift_lines", "multilabel_shift_summary",
    "multilabel_shift_lines",
]

_EPS = 1e-6  # probabilities are clipped to [EPS, 1 - EPS] before taking logits


def logit(p: Any) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def fit_logistic(
    x: np.ndarray, y: np.ndarray, *, offset: np.ndarray | None = None, max_iter: int = 100, tol: float = 1e-10
) -> np.ndarray:
    """Maximum-likelihood coefficients of logit P(y=1) = x @ beta + offset (x: n x k, with its own
    intercept column). Newton steps with step halving, so separable data stops at large
    finite coefficients instead of diverging."""
    x = np.asarray(x, dtype=np.float64).reshape(len(y), -1)
    y = np.asarray(y, dtype=np.float64)
    offset = np.zeros(len(y)) if offset is None else np.asarray(offset, dtype=np.float64)
    beta = np.zeros(x.shape[1])

    def loglik(b: np.ndarray) -> float:
        eta = x @ b + offset
        return float(np.sum(y * eta - np.logaddexp(0.0, eta)))

    current = loglik(beta)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(x @ beta + offset)))
        gradient = x.T @ (y - p)
        hessian = (x * (p * (1 - p))[:, None]).T @ x + 1e-12 * np.eye(x.shape[1])
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-6 and loglik(beta + scale * step) < current - 1e-12:
            scale /= 2
        beta = beta + scale * step
        previous, current = current, loglik(beta)
        if abs(current - previous) < tol * (1 + abs(current)):
            break
    return beta


def calibration_fit(y_true: Any, prob_pos: Any) -> dict[str, float | None]:
    """Calibration in the large (intercept, slope fixed at 1) and calibration slope; None when
    the labels hold one class only (nothing to fit)."""
    y = np.asarray(y_true, dtype=np.float64)
    z = logit(prob_pos)
    if len(y) == 0 or y.min() == y.max():
        return {"calibration_in_the_large": None, "calibration_slope": None, "calibration_intercept": None}
    (in_the_large,) = fit_logistic(np.ones((len(y), 1)), y, offset=z)
    intercept, slope = fit_logistic(np.column_stack([np.ones(len(y)), z]), y)
    return {
        "calibration_in_the_large": float(in_the_large),
        "calibration_slope": float(slope),
        "calibration_intercept": float(intercept),
    }


def shift_summary(
    y_true: Any, prob_pos: Any, *, reference_y: Any | None, reference_prob: Any | None, reference: str
) -> dict[str, Any]:
    """Prevalence, score distribution against the reference split, calibration in the large and slope.

    `prob_pos`/`reference_prob` are calibrated positive-class probabilities (as the model
    reports them); `reference` names the reference split ("test split of RUN"), or the
    reference arrays are None when the run has no predictions to compare with.
    """
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(prob_pos, dtype=np.float64)
    out: dict[str, Any] = {
        "n": int(len(y)),
        "prevalence": float(y.mean()) if len(y) else None,
        "mean_probability": float(p.mean()) if len(p) else None,
        **calibration_fit(y, p),
        "reference": None,
    }
    if reference_y is None or reference_prob is None or len(reference_prob) == 0 or len(p) == 0:
        return out
    ref_y = np.asarray(reference_y, dtype=np.float64)
    ref_p = np.asarray(reference_prob, dtype=np.float64)
    ks = ks_2samp(p, ref_p)
    out["reference"] = {
        "name": reference,
        "n": int(len(ref_p)),
        "prevalence": float(ref_y.mean()),
        "mean_probability": float(ref_p.mean()),
        "ks_distance": float(ks.statistic),
        "ks_pvalue": float(ks.pvalue),
        **calibration_fit(ref_y, ref_p),
    }
    return out


def shift_lines(summary: dict[str, Any]) -> list[str]:
    """The summary as short console lines."""
    fmt = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [
        f"Shift: prevalence {fmt(summary['prevalence'])}, mean predicted {fmt(summary['mean_probability'])}; "
        f"calibration in the large {fmt(summary['calibration_in_the_large'])} (ideal 0), "
        f"slope {fmt(summary['calibration_slope'])} (ideal 1)"
    ]
    ref = summary.get("reference")
    if ref:
        lines.append(
            f"  vs {ref['name']}: prevalence {fmt(ref['prevalence'])}, KS distance of the scores "
            f"{fmt(ref['ks_distance'])} (p = {ref['ks_pvalue']:.2g})"
        )
    else:
        lines.append("  no predictions of the run's own test split to compare the scores with")
    if summary.get("ood_flagged_fraction") is not None:  # evaluate adds it when the model has an OOD guard
        lines.append(f"  {summary['ood_flagged_fraction']:.1%} of the images flagged as foreign by the OOD guard")
    return lines


def _known_pairs(targets: np.ndarray, probs: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of the known entries: of column k, or of every column pooled."""
    t, p = (targets, probs) if k is None else (targets[:, k], probs[:, k])
    known = ~np.isnan(t)
    return t[known].astype(np.float64), p[known].astype(np.float64)


def multilabel_shift_summary(
    targets: Any, probs: Any, findings: Sequence[str], *, reference_targets: Any | None, reference_probs: Any | None,
    reference: str, missing: Sequence[str] = (),
) -> dict[str, Any]:
    """:func:`shift_summary` per finding (known labels only) under "findings", and pooled over the
    known image-finding pairs at the top level ("pooled": true). ``reference_*`` are the run's own
    targets (1 / 0 / NaN) and probabilities in the same finding order, or None. ``missing`` findings
    (no label in this set) are listed, not summarised."""
    t, p = np.asarray(targets, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    has_ref = reference_targets is not None and reference_probs is not None
    rt = np.asarray(reference_targets, dtype=np.float64) if has_ref else None
    rp = np.asarray(reference_probs, dtype=np.float64) if has_ref else None

    def one(k: int | None) -> dict[str, Any]:
        y, prob = _known_pairs(t, p, k)
        ref_y, ref_p = _known_pairs(rt, rp, k) if rt is not None and rp is not None else (None, None)
        return shift_summary(y, prob, reference_y=ref_y, reference_prob=ref_p, reference=reference)

    per_finding = {f: one(k) for k, f in enumerate(findings) if f not in missing}
    return {**one(None), "pooled": True, "images": int(t.shape[0]), "findings": per_finding, "missing": list(missing)}


def multilabel_shift_lines(summary: dict[str, Any]) -> list[str]:
    """Console lines: the pooled summary, then one line per finding."""
    fmt = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = ["Shift, pooled over the known image-finding pairs:", *("  " + line for line in shift_lines(summary))]
    for finding, s in summary["findings"].items():
        ref = s.get("reference") or {}
        against = (f"; vs reference prevalence {fmt(ref.get('prevalence'))}, KS {fmt(ref.get('ks_distance'))}" if ref else "")
        lines.append(
            f"  {finding}: prevalence {fmt(s['prevalence'])}, calibration in the large {fmt(s['calibration_in_the_large'])}, "
            f"slope {fmt(s['calibration_slope'])}{against}"
        )
    for finding in summary.get("missing", []):
        lines.append(f"  {finding}: no labels in this set (masked for every image)")
    return lines
