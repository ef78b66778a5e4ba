"""history.csv and the best weights, written by Lightning callbacks during a real (tiny) fit."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medtransfer.train.callbacks import HISTORY_COLUMNS, BestWeights, HistoryWriter, read_history, write_history


class Scripted(L.LightningModule):
    """A linear classifier whose validation loss per epoch is scripted; keeps a copy of its weights per epoch."""

    def __init__(self, val_losses: list[float]):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.net = nn.Linear(4, 2)
        self.val_losses = val_losses
        self.weights_at_epoch: dict[int, dict[str, torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.model.net(images)
        loss = nn.functional.cross_entropy(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        self.log("train/acc", (logits.argmax(1) == labels).float().mean(), on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.val_losses[self.current_epoch], on_epoch=True)
        self.log("val/acc", 0.5, on_epoch=True)

    def on_validation_epoch_end(self):
        self.weights_at_epoch[self.current_epoch + 1] = {k: v.clone() for k, v in self.model.net.state_dict().items()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def fit(module: Scripted, callbacks: list) -> None:
    data = TensorDataset(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 2)
    trainer = L.Trainer(
        max_epochs=len(module.val_losses), accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=8))


def test_history_has_one_row_per_epoch_with_the_logged_values(tmp_path):
    module = Scripted([0.9, 0.7, 0.8])
    fit(module, [HistoryWriter(tmp_path / "history.csv")])
    rows = read_history(tmp_path / "history.csv")
    assert (tmp_path / "history.csv").read_text().splitlines()[0] == ",".join(HISTORY_COLUMNS)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["val_loss"] for r in rows] == pytest.approx([0.9, 0.7, 0.8])
    assert all(r["val_acc"] == 0.5 and r["lr"] == 0.5 and r["seconds"] >= 0 for r in rows)
    assert all(0 <= r["train_acc"] <= 1 and math.isfinite(r["train_loss"]) for r in rows)


def test_a_repeated_epoch_replaces_its_row_and_later_ones(tmp_path):
    path = tmp_path / "history.csv"
    stale = {"train_loss": 1.0, "train_acc": 0.0, "val_loss": 5.0, "val_acc": 0.0, "lr": 0.1, "seconds": 1.0}
    write_history([{"epoch": e, **stale} for e in (1, 2, 3)], path)  # rows written after the resumed checkpoint
    fit(Scripted([0.4, 0.3]), [HistoryWriter(path)])
    rows = read_history(path)
    assert [r["epoch"] for r in rows] == [1, 2] and [r["val_loss"] for r in rows] == pytest.approx([0.4, 0.3])


def test_history_round_trip_and_missing_file(tmp_path):
    row = {"epoch": 1, "train_loss": 0.5, "train_acc": 0.75, "val_loss": 0.25, "val_acc": 1.0, "lr": 1e-3,
           "seconds": 2.5, "extra": "dropped"}
    write_history([row], tmp_path / "h.csv")
    assert read_history(tmp_path / "h.csv") == [{k: row[k] for k in HISTORY_COLUMNS}]
    assert isinstance(read_history(tmp_path / "h.csv")[0]["epoch"], int)
    assert read_history(tmp_path / "missing.csv") == []


def test_best_weights_are_those_of_the_lowest_finite_validation_loss(tmp_path):
    module = Scripted([0.9, float("nan"), 0.6, 0.7])
    best = BestWeights(tmp_path / "best.safetensors")
    fit(module, [best])
    assert (best.best_epoch, best.best_score) == (3, pytest.approx(0.6))
    restored = nn.Linear(4, 2)
    best.load_best(restored)
    for name, value in restored.state_dict().items():
        torch.testing.assert_close(value, module.weights_at_epoch[3][name])
    assert not torch.equal(restored.weight, module.model.net.weight)  # training went on after epoch 3


def test_no_finite_validation_loss_writes_no_weights(tmp_path):
    best = BestWeights(tmp_path / "best.safetensors")
    fit(Scripted([float("nan"), float("inf")]), [best])
    assert not best.path.exists() and best.best_epoch == 0


def test_best_weights_state_survives_a_checkpoint(tmp_path):
    best = BestWeights(tmp_path / "best.safetensors")
    best.best_score, best.best_epoch = 0.42, 7
    resumed = BestWeights(tmp_path / "best.safetensors")
    resumed.load_state_dict(best.state_dict())
    assert (resumed.best_score, resumed.best_epoch) == (0.42, 7)


# --- gradual unfreezing and weight averaging, on a random-init resnet18 and 16 px images -------------------------

from medtransfer.config import TrainConfig  # noqa: E402
from medtransfer.data.datamodule import TransferDataModule  # noqa: E402
from medtransfer.models.backbones import create_backbone  # noqa: E402
from medtransfer.models.module import ClassifierModule  # noqa: E402
from medtransfer.models.strategies import Strategy, backbone_children, build_transfer_model  # noqa: E402
from medtransfer.train.callbacks import GradualUnfreezing  # noqa: E402
from medtransfer.train.fit import fit_with_lightning  # noqa: E402

RESNET18_GROUPS = ["layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]  # children with parameters, head down


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        self.images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        self.labels = [i % 2 for i in range(n)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


def resnet_module(strategy: str, lr_decay: float = 1.0) -> ClassifierModule:
    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = build_transfer_model(net, spec, Strategy(strategy))
    return ClassifierModule(model, lr=1e-2, weight_decay=0.0, warmup_epochs=0, channels_last=False, lr_decay=lr_decay)


class Recorder(L.Callback):
    """Per epoch (after GradualUnfreezing ran): optimizer group names, their lr relative to the head's, trainable children."""

    def __init__(self):
        self.epochs = []

    def on_train_epoch_start(self, trainer, pl_module):
        groups = trainer.optimizers[0].param_groups
        model = pl_module.model
        trainable = [n for n in RESNET18_GROUPS if all(p.requires_grad for p in model.net.get_submodule(n).parameters())]
        self.epochs.append(([g["name"] for g in groups], [g["initial_lr"] / groups[0]["initial_lr"] for g in groups],
                            trainable, model.net.layer4.training))


def test_gradual_unfreezing_thaws_one_group_per_epoch_from_the_head_down_with_decayed_lrs():
    module, recorder = resnet_module("gradual", lr_decay=0.5), Recorder()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        callbacks=[GradualUnfreezing(every=1, lr_decay=0.5), recorder])
    data = TransferDataModule(train=Images(8, 0), val=Images(4, 1), batch_size=4, num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data)
    assert recorder.epochs == [
        (["head"], [1.0], [], False),
        (["head", "layer4"], [1.0, 0.5], ["layer4"], True),
        (["head", "layer4", "layer3"], [1.0, 0.5, 0.25], ["layer4", "layer3"], True),
    ]
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert len(scheduler.base_lrs) == len(scheduler.lr_lambdas) == 3  # the thawed groups follow the schedule too


def test_gradual_unfreezing_resumed_mid_schedule_restores_frozen_state_and_optimizer_groups(tmp_path):
    settings = dict(batch_size=4, progress=False, lr=1e-2, warmup_epochs=0, strategy="gradual", unfreeze_every=2,
                    lr_decay=0.5)
    data = TransferDataModule(train=Images(8, 0), val=Images(4, 1), batch_size=4, num_workers=0)
    fit_with_lightning(resnet_module("gradual", 0.5), data, TrainConfig(epochs=3, **settings), tmp_path,
                       accelerator="cpu", precision="32-true", resume=False)
    resumed = resnet_module("gradual", 0.5)  # a fresh process: everything frozen until the callback re-applies the epoch
    fit_with_lightning(resumed, data, TrainConfig(epochs=5, **settings), tmp_path, accelerator="cpu",
                       precision="32-true", resume=True)
    assert [r["epoch"] for r in read_history(tmp_path / "history.csv")] == [1, 2, 3, 4, 5]
    # 0-based epoch 4 with a group every 2 epochs: layer4 and layer3 train, the rest is frozen (BN in eval mode)
    model = resumed.model
    assert set(backbone_children(model.net, model.spec)) - set(model.frozen) == {"layer4", "layer3"}
    model.train()
    assert model.net.layer3.training and not model.net.layer2.training
    groups = resumed.trainer.optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["head", "layer4", "layer3"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-2, 5e-3, 2.5e-3])


def test_ema_weights_differ_from_the_raw_ones_and_are_what_is_kept(tmp_path):
    settings = TrainConfig(epochs=1, batch_size=4, progress=False, lr=5e-2, warmup_epochs=0, weight_averaging="ema",
                           ema_decay=0.5)
    module = resnet_module("finetune")
    data = TransferDataModule(train=Images(16, 0), val=Images(4, 1), batch_size=4, num_workers=0)
    fit_with_lightning(module, data, settings, tmp_path, accelerator="cpu", precision="32-true", resume=False)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    averaged = {k.removeprefix("model.net."): v for k, v in checkpoint["state_dict"].items()}
    raw = {k.removeprefix("model.net."): v for k, v in checkpoint["current_model_state"].items()}
    kept = module.model.net.state_dict()
    assert not torch.allclose(raw["fc.weight"], averaged["fc.weight"])
    for name in ("fc.weight", "layer4.1.conv2.weight", "bn1.running_mean"):  # buffers are averaged as well
        assert torch.allclose(kept[name], averaged[name]), name
