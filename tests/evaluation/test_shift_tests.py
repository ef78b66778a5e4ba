"""Label-free two-sample tests (KS on scores, MMD on features), the prior-matched reference and the verdict."""

from __future__ import annotations

import numpy as np
import pytest

from medtransfer.evaluation.shift_tests import (
    APPEARANCE, FOREIGN, NO_SHIFT, PREVALENCE, images_to_label, ks_test, matched_reference, mmd_test, shift_verdict,
)


def test_ks_finds_a_score_shift_and_not_its_absence():
    rng = np.random.default_rng(0)
    same = ks_test(rng.random(300), rng.random(300))
    moved = ks_test(rng.random(300), rng.random(300) ** 3)
    assert same["p_value"] > 0.05 and moved["p_value"] < 1e-6 and moved["statistic"] > same["statistic"]


def test_mmd_detects_a_feature_shift_with_a_permutation_p_value():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(150, 40))
    same = mmd_test(reference, rng.normal(size=(120, 40)), n_permutations=200, seed=0)
    moved = mmd_test(reference, rng.normal(size=(120, 40)) + 0.4, n_permutations=200, seed=0)
    assert same["p_value"] > 0.05 and moved["p_value"] <= 1 / 201 + 1e-12
    assert moved["z"] > 5 > same["z"] and moved["dims"] == 32


def test_mmd_of_too_few_images_says_so():
    assert mmd_test(np.zeros((1, 3)), np.zeros((5, 3)))["p_value"] is None


@pytest.mark.parametrize("share", [0.2, 0.5, 0.8])
def test_the_matched_reference_has_the_wanted_positive_share(share):
    labels = np.array([1] * 300 + [0] * 100)
    rows = matched_reference(labels, share, seed=0)
    assert len(set(rows)) == len(rows)
    assert labels[rows].mean() == pytest.approx(share, abs=0.01)


P = {"p_value": 0.5, "n_target": 300}
LOW = {"p_value": 1e-4, "n_target": 300}


@pytest.mark.parametrize("ks,mmd,matched,ood,adapted,kind,text", [
    (P, P, (P, P), 0.04, False, NO_SHIFT, "no detectable shift"),
    (LOW, P, (P, P), 0.04, True, PREVALENCE, "prevalence shift, adapted"),
    (LOW, LOW, (P, P), None, False, PREVALENCE, "prevalence shift, not adapted"),
    (LOW, LOW, (P, LOW), 0.04, True, APPEARANCE, "appearance shift: the model's figures on this site are not known"),
    (P, P, (P, P), 0.5, False, FOREIGN, "foreign images"),
])
def test_the_verdict(ks, mmd, matched, ood, adapted, kind, text):
    verdict = shift_verdict(ks=ks, mmd=mmd, matched_ks=matched[0], matched_mmd=matched[1], ood_share=ood, ood_limit=0.25,
                            positive_share=0.4, prior_adapted=adapted)
    assert verdict["kind"] == kind and verdict["verdict"].startswith(text)
    if kind in (APPEARANCE, FOREIGN):
        assert f"label {verdict['images_to_label']} images and run recalibrate" in verdict["verdict"]


def test_each_test_is_read_at_half_alpha():
    borderline = {"p_value": 0.04, "n_target": 300}
    assert shift_verdict(ks=borderline, mmd=P, matched_ks=P, matched_mmd=P, ood_share=None, ood_limit=0.25,
                         positive_share=0.5, prior_adapted=False)["kind"] == NO_SHIFT


def test_a_small_sample_warns_that_the_tests_have_little_power():
    small = {"p_value": 0.5, "n_target": 12}
    verdict = shift_verdict(ks=small, mmd=P, matched_ks=P, matched_mmd=P, ood_share=None, ood_limit=0.25,
                            positive_share=0.5, prior_adapted=False)
    assert any("little power" in reason for reason in verdict["reasons"])


def test_images_to_label_grows_as_the_rarer_class_gets_rarer():
    assert images_to_label(0.5) < images_to_label(0.2) < images_to_label(0.05)
    assert images_to_label(0.5) == 2 * int(np.ceil(62 / 0.5))
