"""Linear probe on cached features: the features, the head's restoration, training, determinism."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import Strategy, TransferModel, build_transfer_model
from medtransfer.train import feature_probe
from medtransfer.train.feature_probe import epoch_batches, extract_features, train_head_on_features

CPU = torch.device("cpu")


def _model(seed: int = 0) -> TransferModel:
    torch.manual_seed(seed)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    return build_transfer_model(net, spec, Strategy("linear-probe"))


def _images(n: int = 20, size: int = 40, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=generator), torch.arange(n) % 2)


def _head_inputs(model: TransferModel, images: torch.Tensor) -> torch.Tensor:
    seen = []
    hook = model.head.register_forward_hook(lambda module, args, output: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        hook.remove()
    return torch.cat(seen)


def _separable(n: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, d, generator=generator)
    x[:, 0] = (2 * y - 1) * (1.0 + x[:, 0].abs())  # class sign on feature 0, margin >= 1
    return x, y


def test_features_are_the_penultimate_activations_in_dataset_order():
    model = _model()
    data = _images(20, 40)
    features = extract_features(model, data, batch_size=6, device=CPU, precision="32-true", num_workers=0)
    expected = _head_inputs(model, data.tensors[0])
    assert features.shape == (20, model.head.in_features) == (20, 512)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_head_is_restored_after_extraction_and_after_a_failure():
    model = _model()
    head = model.head
    model.train()
    extract_features(model, _images(4, 32), batch_size=2, device=CPU, precision="32-true", num_workers=0)
    assert model.head is head and model.net.fc is head
    assert model.training  # train/eval mode given back

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            raise RuntimeError("unreadable image")

    with pytest.raises(RuntimeError, match="unreadable image"):
        extract_features(model, Broken(), batch_size=2, device=CPU, precision="32-true", num_workers=0)
    assert model.net.fc is head
    logits = model(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 2)


def test_features_match_for_a_frozen_bf16_pass_within_bf16_tolerance():
    model = _model()
    data = _images(4, 32)
    fp32 = extract_features(model, data, batch_size=4, device=CPU, precision="32-true", num_workers=0)
    bf16 = extract_features(model, data, batch_size=4, device=CPU, precision="bf16-mixed", num_workers=0)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert torch.nn.functional.cosine_similarity(bf16, fp32).min() > 0.98


def test_training_on_features_learns_a_separable_toy_set():
    torch.manual_seed(0)
    train_x, train_y = _separable(64)
    val_x, val_y = _separable(32, seed=1)
    head = nn.Linear(8, 2)
    history, best = train_head_on_features(
        head, train_x, train_y, val_x, val_y, epochs=30, lr=0.05, weight_decay=0.0, batch_size=16
    )
    assert [row["epoch"] for row in history] == list(range(1, 31))
    assert set(history[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"}
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["val_acc"] == 1.0
    best_epoch = min(history, key=lambda row: row["val_loss"])
    head.load_state_dict(best)
    with torch.no_grad():
        loss = nn.functional.cross_entropy(head(val_x), val_y)
    assert float(loss) == pytest.approx(best_epoch["val_loss"], rel=1e-5)


def test_result_is_deterministic_for_a_seed_and_depends_on_it():
    train_x, train_y = _separable(40)
    val_x, val_y = _separable(10, seed=1)
    torch.manual_seed(0)
    start = nn.Linear(8, 2)

    def run(seed):
        head = copy.deepcopy(start)
        history, best = train_head_on_features(
            head, train_x, train_y, val_x, val_y, epochs=3, lr=0.01, weight_decay=1e-4, batch_size=8, seed=seed
        )
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history], best

    (history_a, best_a), (history_b, best_b), (history_c, _) = run(3), run(3), run(4)
    assert history_a == history_b
    for key in best_a:
        assert torch.equal(best_a[key], best_b[key])
    assert history_a != history_c


def test_patience_stops_early_and_class_weights_are_checked():
    train_x, train_y = _separable(20)
    val_x, val_y = _separable(10, seed=1)
    history, _ = train_head_on_features(
        nn.Linear(8, 2), train_x, train_y, val_x, -val_y + 1,  # flipped validation labels: val loss rises
        epochs=50, lr=0.05, weight_decay=0.0, batch_size=10, patience=2,
    )
    assert len(history) < 50
    with pytest.raises(ValueError, match="class_weights"):
        train_head_on_features(
            nn.Linear(8, 2), train_x, train_y, val_x, val_y, epochs=1, lr=0.1, weight_decay=0.0, batch_size=4,
            class_weights=[1.0, 2.0, 3.0],
        )
    with pytest.raises(ValueError, match=r"n x 8 features, got \(10, 3\)"):
        train_head_on_features(
            nn.Linear(8, 2), train_x, train_y, val_x[:, :3], val_y, epochs=1, lr=0.1, weight_decay=0.0, batch_size=4
        )


def test_epoch_batches_cover_every_row_once():
    batches = epoch_batches(10, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))


def test_docstring_example_runs():
    assert doctest.testmod(feature_probe, raise_on_error=True).failed == 0
