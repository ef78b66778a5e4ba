"""The two fit paths on tiny tensors: best weights, history, early stop, interruption, no finite loss."""

from __future__ import annotations

import signal

import pytest
import torch
from rich.console import Console
from torch.utils.data import Dataset

from medtransfer.config import TrainConfig
from medtransfer.data.datamodule import TransferDataModule
from medtransfer.errors import DataError, TrainingInterrupted
from medtransfer.models.backbones import create_backbone
from medtransfer.models.module import ClassifierModule
from medtransfer.models.strategies import Strategy, TransferModel, build_transfer_model
from medtransfer.train.callbacks import HistoryWriter, read_history
from medtransfer.train.fit import Fit, fit_with_lightning, train_probe_on_features


class Images(Dataset):
    """(image, label) pairs with a `labels` list, as CachedImageDataset has."""

    def __init__(self, n: int, seed: int, *, fill: float | None = None):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 16, 16, generator=generator) if fill is None else torch.full((n, 3, 16, 16), fill)
        self.labels = [i % 2 for i in range(n)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


def model(strategy: str = "freeze") -> TransferModel:
    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    return build_transfer_model(net, spec, Strategy(strategy, 7))


def config(**values) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 4, "progress": False, "lr": 1e-2, "warmup_epochs": 0, **values})


def lightning(
    tmp_path, settings: TrainConfig, *, val: Images | None = None, resume: bool = False
) -> tuple[Fit, ClassifierModule]:
    data = TransferDataModule(train=Images(8, 0), val=val or Images(4, 1), batch_size=4, num_workers=0)
    module = ClassifierModule(model(), lr=settings.lr, weight_decay=0.0, warmup_epochs=0, channels_last=False)
    return fit_with_lightning(
        module, data, settings, tmp_path, accelerator="cpu", precision="32-true", resume=resume
    ), module


def test_lightning_fit_keeps_the_best_epoch_and_writes_history_and_checkpoints(tmp_path):
    fit, module = lightning(tmp_path, config(epochs=3))
    history = read_history(tmp_path / "history.csv")
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert fit.best_epoch == min(history, key=lambda r: r["val_loss"])["epoch"] and fit.stopped_early is False
    assert (tmp_path / "checkpoints" / "best.safetensors").is_file() and (tmp_path / "checkpoints" / "last.ckpt").exists()
    from safetensors.torch import load_file

    best = load_file(str(tmp_path / "checkpoints" / "best.safetensors"))
    for name, value in module.model.net.state_dict().items():  # the model holds the best weights afterwards
        torch.testing.assert_close(value, best[name])


def test_lightning_fit_without_a_finite_validation_loss_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no finite validation loss; lower --lr or check the data"):
        lightning(tmp_path, config(), val=Images(4, 1, fill=float("nan")))


def test_interrupted_fit_names_the_resume_command(tmp_path, monkeypatch):
    original = HistoryWriter.on_train_epoch_start

    def interrupt_in_second_epoch(self, trainer, pl_module):
        original(self, trainer, pl_module)
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(HistoryWriter, "on_train_epoch_start", interrupt_in_second_epoch)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(TrainingInterrupted, match=f"medtransfer train --resume {tmp_path}$"):
            lightning(tmp_path, config(epochs=3))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores Ctrl-C after a graceful shutdown
    assert [r["epoch"] for r in read_history(tmp_path / "history.csv")] == [1]
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_feature_probe_fit_trains_the_head_only_and_writes_history(tmp_path):
    probe = model("linear-probe")
    body = {k: v.clone() for k, v in probe.net.state_dict().items() if not k.startswith("fc.")}
    datasets = {"train": Images(12, 0), "val": Images(6, 1)}
    fit = train_probe_on_features(
        probe, datasets, config(epochs=5, patience=2), tmp_path / "history.csv", class_weights=[1.0, 2.0],
        device=torch.device("cpu"), precision="32-true", workers=0, console=Console(quiet=True),
    )
    history = read_history(tmp_path / "history.csv")
    assert fit.best_epoch == min(history, key=lambda r: r["val_loss"])["epoch"]
    assert fit.stopped_early is (len(history) < 5)
    assert all(torch.equal(v, body[k]) for k, v in probe.net.state_dict().items() if k in body)


def test_compile_compiles_the_network_in_place_so_saved_weights_keep_their_names(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    fit, module = lightning(tmp_path, config(epochs=1, compile=True))
    assert compiled == ["ResNet"] and fit.best_epoch == 1
    assert all(not name.startswith("_orig_mod") for name in module.model.net.state_dict())
