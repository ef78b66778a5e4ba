"""adapt's refusals on their own: each names the data folder, what moved and the way out; nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtransfer.adapt import checks
from medtransfer.errors import DataError


def _shift(em: float, ci: list[float] | None, z: float = 2.0, kind: str = "appearance") -> dict:
    return {"kind": kind, "prior": {"em": em, "em_ci": ci, "source_prior": 0.7, "em_converged": True},
            "matched_reference": {"features_mmd": {"z": z}}}


def test_batchnorm_that_moves_the_estimated_prevalence_outside_its_interval_is_refused():
    # measured on a shifted chest X-ray set resampled to 30% pneumonia: AdaBN moved EM's estimate 0.431 -> 0.588 and
    # specificity fell from 0.735 to 0.530; on the whole set (0.708 -> 0.686, inside its CI) it helped
    with pytest.raises(DataError, match=r"--data site: BatchNorm statistics of these images moved the estimated "
                                        r"prevalence from 0.431 \[0.308, 0.534\] to 0.588.*validation's \(0.700 positive\)"
                                        r".*Use --method mixture or prior"):
        checks.check_batchnorm(_shift(0.431, [0.308, 0.534]), _shift(0.588, None, z=1.0), Path("site"))
    checks.check_batchnorm(_shift(0.708, [0.640, 0.770]), _shift(0.686, None, z=1.0), Path("site"))


def test_without_an_interval_the_estimate_may_move_by_005():
    checks.check_batchnorm(_shift(0.50, None), _shift(0.54, None, z=1.0), Path("site"))
    with pytest.raises(DataError, match="outside its interval"):
        checks.check_batchnorm(_shift(0.50, None), _shift(0.56, None, z=1.0), Path("site"))


def test_batchnorm_on_a_pure_prevalence_shift_or_moving_features_away_is_refused():
    with pytest.raises(DataError, match="only as a change of prevalence"):
        checks.check_batchnorm(_shift(0.5, None, kind="prevalence"), _shift(0.5, None), Path("site"))
    with pytest.raises(DataError, match=r"further from the validation images \(feature MMD z 2.0 -> 5.0"):
        checks.check_batchnorm(_shift(0.5, None), _shift(0.5, None, z=5.0), Path("site"))


def test_the_passed_checks_name_the_prevalence_before_and_after_batchnorm():
    before, after = _shift(0.708, [0.640, 0.770]), _shift(0.686, None)
    before["ood"] = {"flagged_fraction": 0.04}
    lines = checks.passed_checks(before, after, None, 314, 64, 0.25, 0.4, uses_bn=True)
    assert "BatchNorm: estimated prevalence 0.708 -> 0.686 (refused outside 0.640-0.770)" in lines
