"""Two-sample tests for a shift between the run's validation images and a new site, without labels.

Rabanser, Günnemann & Lipton 2019 ("Failing loudly") found that the simplest detectors work
best: a univariate test on the model's outputs (black-box shift detection) and a kernel
two-sample test on reduced representations. Here:

- :func:`ks_test`: Kolmogorov-Smirnov on the positive-class probability (scipy's exact or
  asymptotic p-value); effect size the KS distance D (0: same distribution, 1: disjoint).
- :func:`mmd_test`: maximum mean discrepancy (Gretton et al. 2012) on the penultimate features,
  standardised and projected on the validation features' first principal components, with a
  Gaussian kernel (bandwidth: the median pairwise distance) and a permutation p-value. Effect
  size: MMD^2 and how many null standard deviations it lies above the null mean.
- :func:`matched_reference`: the validation images subsampled to another class prior. A pure
  prior shift leaves p(x | y) as it was, so the new images should then be indistinguishable
  from this reference; if they are not, the images themselves changed (appearance shift).
- :func:`shift_verdict`: the plain reading of those tests and of the OOD guard's flagged share.
- :func:`images_to_label`: how many labelled images `recalibrate` needs to measure this site.

Everything here is numpy/scipy on arrays; :mod:`medtransfer.evaluation.site_shift` gets the arrays.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import ks_2samp

__all__ = [
    "ALPHA", "NO_SHIFT", "PREVALENCE", "APPEARANCE", "FOREIGN", "images_to_label", "ks_test", "matched_reference",
    "mmd_test", "shift_verdict",
]

ALPHA = 0.05  # family-wise level of the verdict: each of the two tests is read at ALPHA / 2 (Bonferroni)
MMD_MAX_IMAGES = 1500  # per side; a seeded subsample beyond (the kernel matrix grows with the square)
PCA_DIMS = 32
NO_SHIFT, PREVALENCE, APPEARANCE, FOREIGN = "none", "prevalence", "appearance", "foreign"
LOW_POWER_IMAGES = 30  # fewer new images than this: "no detectable shift" says little


def ks_test(reference: Any, target: Any) -> dict[str, Any]:
    """Two-sample KS test of two score samples: distance D, its p-value and the sample sizes."""
    a, b = np.asarray(reference, dtype=np.float64).ravel(), np.asarray(target, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        return {"statistic": None, "p_value": None, "n_reference": int(a.size), "n_target": int(b.size)}
    result = ks_2samp(a, b)
    return {"statistic": float(result.statistic), "p_value": float(result.pvalue), "n_reference": int(a.size),
            "n_target": int(b.size)}


def _reduce(reference: np.ndarray, target: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Both standardised by the reference's mean and spread, then projected on its first `dims` principal axes."""
    mean, std = reference.mean(axis=0), reference.std(axis=0) + 1e-6
    a, b = (reference - mean) / std, (target - mean) / std
    if a.shape[1] > dims and a.shape[0] > 1:
        _, _, vt = np.linalg.svd(a, full_matrices=False)
        a, b = a @ vt[:dims].T, b @ vt[:dims].T
    return a, b


def _subsample(x: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= limit else x[np.sort(rng.choice(len(x), size=limit, replace=False))]


def _mmd2(kernel: np.ndarray, member: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 for each row of `member` ((b, n) 0/1: 1 = first sample), from the pooled kernel matrix."""
    m = member.sum(axis=1)
    n = member.shape[1] - m
    other = 1.0 - member
    diagonal = np.diag(kernel)
    kx = member @ kernel
    xx = (kx * member).sum(axis=1) - member @ diagonal
    yy = ((other @ kernel) * other).sum(axis=1) - other @ diagonal
    xy = (kx * other).sum(axis=1)
    return xx / (m * (m - 1)) + yy / (n * (n - 1)) - 2 * xy / (m * n)


def mmd_test(
    reference: Any, target: Any, *, n_permutations: int = 500, dims: int = PCA_DIMS, seed: int = 0
) -> dict[str, Any]:
    """Kernel two-sample test of two feature samples ((n, d) each, d >= 1) with a permutation p-value."""
    rng = np.random.default_rng(seed)
    a = _subsample(np.asarray(reference, dtype=np.float64), MMD_MAX_IMAGES, rng)
    b = _subsample(np.asarray(target, dtype=np.float64), MMD_MAX_IMAGES, rng)
    if len(a) < 2 or len(b) < 2:
        return {"mmd2": None, "p_value": None, "z": None, "n_reference": int(len(a)), "n_target": int(len(b))}
    a, b = _reduce(a.reshape(len(a), -1), b.reshape(len(b), -1), dims)
    pooled = np.concatenate([a, b])
    squared = np.sum(pooled**2, axis=1)
    distances = np.clip(squared[:, None] + squared[None, :] - 2 * pooled @ pooled.T, 0.0, None)
    bandwidth = float(np.median(distances[np.triu_indices(len(pooled), k=1)])) or 1.0
    kernel = np.exp(-distances / bandwidth)
    observed = np.zeros((1, len(pooled)))
    observed[0, : len(a)] = 1.0
    statistic = float(_mmd2(kernel, observed)[0])
    null = []
    for start in range(0, n_permutations, 50):
        rows = min(50, n_permutations - start)
        member = np.zeros((rows, len(pooled)))
        for r in range(rows):
            member[r, rng.permutation(len(pooled))[: len(a)]] = 1.0
        null.append(_mmd2(kernel, member))
    values = np.concatenate(null)
    spread = float(values.std(ddof=1)) or 1e-12
    return {
        "mmd2": statistic, "p_value": float((np.sum(values >= statistic) + 1) / (len(values) + 1)),
        "z": float((statistic - values.mean()) / spread), "n_reference": int(len(a)), "n_target": int(len(b)),
        "dims": int(a.shape[1]), "n_permutations": int(n_permutations),
    }


def matched_reference(labels: Any, positive_share: float, *, seed: int = 0) -> np.ndarray:
    """Indices of the largest subsample of the (0/1) reference labels whose positive share is `positive_share`:
    every image of the rarer-than-wanted class kept, the other class drawn without replacement (seeded)."""
    y = np.asarray(labels).astype(int).ravel()
    positives, negatives = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    share = float(np.clip(positive_share, 0.0, 1.0))
    if len(positives) == 0 or len(negatives) == 0 or share in (0.0, 1.0):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep_pos = min(len(positives), int(round(len(negatives) * share / (1 - share))))
    keep_neg = min(len(negatives), int(round(keep_pos * (1 - share) / share)))
    chosen = np.concatenate([rng.choice(positives, keep_pos, replace=False), rng.choice(negatives, keep_neg, replace=False)])
    return np.sort(chosen)


def _rejects(test: dict[str, Any] | None, level: float) -> bool:
    return bool(test and test.get("p_value") is not None and test["p_value"] < level)


def images_to_label(positive_share: float, *, margin: float = 0.075, expected: float = 0.9) -> int:
    """Labelled images `recalibrate` needs (fit and report halves) for its report half to hold enough of the rarer
    class that a sensitivity or specificity near `expected` is measured within +-`margin` (95%, normal approximation)."""
    per_class = math.ceil(1.96**2 * expected * (1 - expected) / margin**2)
    rarer = max(min(positive_share, 1 - positive_share), 0.05)
    return int(2 * math.ceil(per_class / rarer))


def shift_verdict(
    *, ks: dict[str, Any], mmd: dict[str, Any], matched_ks: dict[str, Any] | None, matched_mmd: dict[str, Any] | None,
    ood_share: float | None, ood_limit: float, positive_share: float, prior_adapted: bool, alpha: float = ALPHA,
) -> dict[str, Any]:
    """The plain reading: no detectable shift, a prevalence shift (the tests pass once the validation images are
    matched to the estimated prior), an appearance shift (they do not), or foreign images (the OOD guard flags more
    than `ood_limit`). Each test is read at alpha / 2. Returns the kind, the sentence and the reasons."""
    level = alpha / 2
    reasons: list[str] = []
    n = ks.get("n_target") or 0
    if ood_share is not None and ood_share > ood_limit:
        kind = FOREIGN
        reasons.append(f"the OOD guard flags {ood_share:.1%} of the images (limit {ood_limit:.0%})")
    elif not (_rejects(ks, level) or _rejects(mmd, level)):
        kind = NO_SHIFT
        reasons.append(f"neither the scores (KS p = {_p(ks)}) nor the features (MMD p = {_p(mmd)}) differ at "
                       f"{level:.3g} from the validation images")
        if n < LOW_POWER_IMAGES:
            reasons.append(f"only {n} images: the tests have little power")
    elif not (_rejects(matched_ks, level) or _rejects(matched_mmd, level)):
        kind = PREVALENCE
        reasons.append(f"the images differ from validation (KS p = {_p(ks)}, MMD p = {_p(mmd)}) but not from validation "
                       f"re-weighted to the estimated prevalence {positive_share:.3f} (KS p = {_p(matched_ks)}, "
                       f"MMD p = {_p(matched_mmd)})")
    else:
        kind = APPEARANCE
        reasons.append(f"the images differ from validation even at the estimated prevalence {positive_share:.3f} "
                       f"(KS p = {_p(matched_ks)}, MMD p = {_p(matched_mmd)})")
    label = images_to_label(positive_share)
    sentences = {
        NO_SHIFT: "no detectable shift",
        PREVALENCE: "prevalence shift, adapted" if prior_adapted else
        "prevalence shift, not adapted (medtransfer adapt --method prior adapts to it)",
        APPEARANCE: f"appearance shift: the model's figures on this site are not known; label {label} images and run "
                    "recalibrate",
        FOREIGN: f"foreign images: many do not look like the training data; the model's figures on this site are not "
                 f"known; label {label} images and run recalibrate",
    }
    return {"kind": kind, "verdict": sentences[kind], "reasons": reasons, "alpha": alpha, "images_to_label": label}


def _p(test: dict[str, Any] | None) -> str:
    return "n/a" if not test or test.get("p_value") is None else f"{test['p_value']:.2g}"
