"""A new prior folded into the classifier bias, and the threshold rules (keep the policy's meaning, or bayes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtransfer.adapt.operating import adapted_threshold, fold_prior, last_linear
from medtransfer.evaluation.calibration import apply_temperature
from medtransfer.evaluation.label_shift import adjust_posteriors
from medtransfer.models.heads import MLPHead
from tests.adapt.conftest import tiny_two_class_model


def test_the_folded_bias_gives_the_saerens_adjusted_posteriors():
    model = tiny_two_class_model()
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        before = model(images).numpy()
        fold_prior(model, 1.7, np.array([0.25, 0.75]), np.array([0.6, 0.4]))
        after = model(images).numpy()
    expected = adjust_posteriors(apply_temperature(before, 1.7), [0.25, 0.75], [0.6, 0.4])
    np.testing.assert_allclose(apply_temperature(after, 1.7), expected, atol=1e-5)


def test_the_logits_layer_of_an_mlp_head_is_its_last_linear():
    head = MLPHead(8, 2)
    assert last_linear(head) is head[-1]


def decisions(probs, threshold):
    return probs >= threshold


@pytest.mark.parametrize("policy", ["youden", "sensitivity:0.95", "specificity:0.9", None])
def test_keep_leaves_every_decision_of_a_class_conditional_policy_as_it_was(policy):
    rng = np.random.default_rng(0)
    p = rng.random(500)
    t, why = adapted_threshold(0.62, policy, "keep", 0.74, 0.4)
    adjusted = adjust_posteriors(np.column_stack([1 - p, p]), [0.26, 0.74], [0.6, 0.4])[:, 1]
    assert t < 0.62 and np.array_equal(decisions(p, 0.62), decisions(adjusted, t)) and why.startswith("keep")


@pytest.mark.parametrize("rule,policy", [("bayes", "youden"), ("keep", "fixed:0.3")])
def test_bayes_and_fixed_keep_the_probability_threshold(rule, policy):
    assert adapted_threshold(0.3, policy, rule, 0.74, 0.4)[0] == 0.3


def test_f1_is_chosen_again_on_validation_reweighted_to_the_new_prior():
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.74).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(size=400) + 2.0 * (2 * y - 1))))
    t, why = adapted_threshold(0.5, "f1", "keep", 0.74, 0.3, val_positive_probs=p, val_is_positive=y)
    adjusted = adjust_posteriors(np.column_stack([1 - p, p]), [0.26, 0.74], [0.7, 0.3])[:, 1]
    w = np.where(y == 1, 0.3 / 0.74, 0.7 / 0.26)

    def f1(cut):
        called = adjusted >= cut
        tp, fp = (w * (called & (y == 1))).sum(), (w * (called & (y == 0))).sum()
        return 2 * tp / (tp + fp + (w * y).sum())

    assert f1(t) == pytest.approx(max(f1(c) for c in adjusted)) and "re-weighted" in why
