"""The task notion: targets, probabilities, decisions and the masked multi-label loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medtransfer.errors import DataError
from medtransfer.task import MULTI_LABEL, SINGLE_LABEL, Task, positive_weights, split_findings

FINDINGS = ("Effusion", "Mass", "Nodule")


@pytest.mark.parametrize(
    ("label", "expected"),
    [("Effusion|Mass", ["Effusion", "Mass"]), ("No Finding", []), ("", []), (" Mass | ", ["Mass"])],
)
def test_split_findings(label, expected):
    assert split_findings(label) == expected


def test_multilabel_targets_mark_present_absent_and_unknown():
    task = Task(MULTI_LABEL, FINDINGS)
    targets = task.targets(["Mass", "", "Effusion|Nodule"], [(), ("Effusion",), ("Mass",)])
    expected = [[0, 1, 0], [math.nan, 0, 0], [1, math.nan, 1]]
    np.testing.assert_array_equal(targets, np.asarray(expected, dtype=np.float32))
    assert task.label_of(np.array([1, 0, 1])) == "Effusion|Nodule"


def test_single_label_targets_are_class_indices_and_unknown_labels_fail():
    task = Task(SINGLE_LABEL, ("NORMAL", "PNEUMONIA"))
    assert task.targets(["PNEUMONIA", "NORMAL"]).tolist() == [1, 0]
    with pytest.raises(DataError, match="not among the classes"):
        task.targets(["VIRUS"])


def test_probabilities_are_per_finding_sigmoids_with_their_own_temperature():
    task = Task(MULTI_LABEL, FINDINGS)
    logits = np.array([[2.0, -1.0, 0.0], [-3.0, 4.0, 1.0]])
    temperatures = [2.0, 0.5, 1.0]
    expected = 1 / (1 + np.exp(-logits / np.asarray(temperatures)))
    np.testing.assert_allclose(task.probabilities(logits, temperatures), expected, rtol=1e-12)
    assert task.decide(expected, [0.5, 0.5, 0.9]).tolist() == [[1, 0, 0], [0, 1, 0]]


def test_single_label_probabilities_are_a_softmax():
    task = Task(SINGLE_LABEL, ("a", "b", "c"))
    logits = np.array([[1.0, 2.0, 0.5]])
    expected = torch.softmax(torch.tensor(logits) / 2.0, dim=1).numpy()
    np.testing.assert_allclose(task.probabilities(logits, 2.0), expected, rtol=1e-12)
    with pytest.raises(DataError, match="one temperature"):
        task.probabilities(logits, [1.0, 1.0, 1.0])


def test_masked_loss_equals_bce_over_the_known_labels_only():
    task = Task(MULTI_LABEL, FINDINGS)
    logits = torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.1, -0.7]])
    targets = torch.tensor([[1.0, math.nan, 0.0], [0.0, 1.0, math.nan]])
    known = ~torch.isnan(targets)
    reference = nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known])
    assert torch.allclose(task.loss(logits, targets), reference)
    weight = torch.tensor([2.0, 3.0, 0.5])
    columns = known.nonzero()[:, 1]
    per = nn.functional.binary_cross_entropy_with_logits(
        logits[known], targets[known], pos_weight=weight[columns], reduction="none"
    )
    assert torch.allclose(task.loss(logits, targets, weight=weight), per.mean())


def test_masked_focal_loss_down_weights_easy_findings():
    task = Task(MULTI_LABEL, ("A",))
    easy = task.loss(torch.tensor([[6.0]]), torch.tensor([[1.0]]), focal_gamma=2.0)
    hard = task.loss(torch.tensor([[-1.0]]), torch.tensor([[1.0]]), focal_gamma=2.0)
    bce_easy = nn.functional.binary_cross_entropy_with_logits(torch.tensor([6.0]), torch.tensor([1.0]))
    assert easy < bce_easy and hard > easy


def test_hits_count_known_decisions_only():
    task = Task(MULTI_LABEL, FINDINGS)
    hits, count = task.hits(torch.tensor([[1.0, -1.0, 1.0]]), torch.tensor([[1.0, 1.0, math.nan]]))
    assert (int(hits), int(count)) == (1, 2)


def test_positive_weights_are_negatives_over_positives_of_known_labels():
    targets = np.array([[1, 0], [0, np.nan], [0, 1], [0, 0]], dtype=np.float32)
    assert positive_weights(targets) == [3.0, 2.0]


def test_a_task_needs_distinct_outputs():
    with pytest.raises(DataError, match="at least 2 distinct classes"):
        Task(SINGLE_LABEL, ("only",))
    with pytest.raises(DataError, match="distinct finding"):
        Task(MULTI_LABEL, ("A", "A"))
