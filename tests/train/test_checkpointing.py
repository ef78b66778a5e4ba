"""Exact resume wherever a kill lands: the epoch's commit order (train/checkpointing.py).

A kill is simulated in-process by raising :class:`Killed` (a BaseException nothing in the code
catches) at one of the reliability benchmark's kill points: nothing after it runs, as with
SIGKILL. tests/e2e/test_resume.py kills real processes.
"""

from __future__ import annotations

import re
import warnings

import lightning as L
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from benchmarks.reliability import install_kill
from medtransfer.config import TrainConfig, resolve_train_config
from medtransfer.data.datamodule import TransferDataModule
from medtransfer.errors import ConfigError, DataError
from medtransfer.models.backbones import create_backbone
from medtransfer.models.module import ClassifierModule
from medtransfer.models.strategies import Strategy, build_transfer_model
from lightning.pytorch.callbacks import StochasticWeightAveraging

from medtransfer.train.callbacks import BEST_EPOCH_KEY, best_file_epoch, read_history, write_history
from medtransfer.train.checkpointing import AtomicCheckpointIO, ResumeCheckpoint, restore_epoch_files
from medtransfer.train.fit import fit_with_lightning, is_out_of_memory
from medtransfer.train.runfolder import check_resumable


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny fits: one torch thread is faster than two contending ones, and this machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Killed(BaseException):
    """Stands in for SIGKILL."""


def die() -> None:
    raise Killed


class Images(Dataset):
    def __init__(self, n: int, seed: int):
        self.images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        self.labels = [i % 2 for i in range(n)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


def settings(**values) -> TrainConfig:
    return TrainConfig(**{"epochs": 3, "batch_size": 4, "progress": False, "lr": 2e-2, "warmup_epochs": 0, **values})


def module(module_class=ClassifierModule, **kwargs) -> ClassifierModule:
    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = build_transfer_model(net, spec, Strategy("finetune"))
    return module_class(model, lr=2e-2, weight_decay=0.0, warmup_epochs=0, channels_last=False, **kwargs)


def train(out, config: TrainConfig, *, resume: bool = False, module_class=ClassifierModule, **kwargs):
    data = TransferDataModule(train=Images(8, 0), val=Images(8, 1), batch_size=config.batch_size, num_workers=0)
    network = module(module_class, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_with_lightning(network, data, config, out, accelerator="cpu", precision="32-true", resume=resume)
    return fit, network


REFERENCES: dict[str, tuple] = {}


def reference(tmp_path_factory, name: str, config: TrainConfig):
    """An uninterrupted run per configuration, trained once per session: (val losses, best epoch, final weights)."""
    if name not in REFERENCES:
        out = tmp_path_factory.mktemp(f"reference-{name}")
        fit, network = train(out, config)
        REFERENCES[name] = ([r["val_loss"] for r in read_history(out / "history.csv")], fit.best_epoch,
                            {k: v.clone() for k, v in network.model.net.state_dict().items()})
    return REFERENCES[name]


def killed_and_resumed(tmp_path, monkeypatch, config: TrainConfig, point: str, epoch: int, index: int = 0):
    with monkeypatch.context() as patches:
        install_kill(point, epoch, index, die=die, patch=patches.setattr)
        with pytest.raises(Killed):
            train(tmp_path, config)
    check_resumable(tmp_path, config, Console(quiet=True))  # what `train --resume` does first
    return train(tmp_path, config, resume=True)


@pytest.mark.parametrize("averaging, point, epoch, index", [
    ("none", "validation", 2, 1),
    ("none", "before-checkpoint", 1, 0),  # where history.csv used to be written before the checkpoint (the issue)
    ("none", "checkpoint-write", 2, 0),
    ("none", "after-checkpoint", 1, 0),  # committed; the best weights and history.csv come from the checkpoint
    ("none", "after-best", 2, 0),
    ("ema", "after-checkpoint", 1, 0),  # the best weights rebuilt from the checkpoint are the averaged ones
    ("swa", "after-checkpoint", 3, 0),  # the last averaged epoch; SWA's BatchNorm pass comes after the resume
])
def test_a_resumed_run_ends_exactly_as_the_uninterrupted_one_wherever_the_kill_lands(
    tmp_path, tmp_path_factory, monkeypatch, averaging, point, epoch, index
):
    config = settings(weight_averaging=averaging, ema_decay=0.5)
    losses, best_epoch, final = reference(tmp_path_factory, averaging, config)
    fit, network = killed_and_resumed(tmp_path, monkeypatch, config, point, epoch, index)
    assert [r["val_loss"] for r in read_history(tmp_path / "history.csv")] == pytest.approx(losses, abs=1e-6)
    assert fit.best_epoch == best_epoch
    if averaging != "swa":  # SWA keeps its final average; best.safetensors holds the best single epoch there
        assert best_file_epoch(tmp_path / "checkpoints" / "best.safetensors") == best_epoch
    for name, value in network.model.net.state_dict().items():  # the best weights, or SWA's average
        torch.testing.assert_close(value, final[name], rtol=0, atol=1e-6)
    assert not list((tmp_path / "checkpoints").glob(".*.tmp*"))


class ScriptedValidation(ClassifierModule):
    """Validation losses from a script, so that early stopping's decisions are known in advance."""

    def __init__(self, model, *, losses: list[float], **kwargs):
        super().__init__(model, **kwargs)
        self.losses = losses

    def on_validation_epoch_end(self):
        self.log("val/loss", self.losses[self.current_epoch])
        self.log("val/acc", 0.5)


def test_early_stopping_counts_continue_across_a_resume(tmp_path, monkeypatch):
    """patience 2: epoch 2 is the best, 3 and 4 are worse, so the run stops after epoch 4, resumed or not (with
    early stopping's state one epoch stale in the checkpoint, a resume from epoch 2 would take 3 as a new best)."""
    config, losses = settings(epochs=6, patience=2), [0.9, 0.5, 0.7, 0.6, 0.4, 0.3]
    whole, _ = train(tmp_path / "whole", config, module_class=ScriptedValidation, losses=losses)
    assert len(read_history(tmp_path / "whole" / "history.csv")) == 4 and whole.stopped_early
    with monkeypatch.context() as patches:
        install_kill("after-epoch", 2, die=die, patch=patches.setattr)
        with pytest.raises(Killed):
            train(tmp_path / "run", config, module_class=ScriptedValidation, losses=losses)
    resumed, _ = train(tmp_path / "run", config, resume=True, module_class=ScriptedValidation, losses=losses)
    assert len(read_history(tmp_path / "run" / "history.csv")) == 4 and resumed.stopped_early
    assert resumed.best_epoch == whole.best_epoch == 2


class Line(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class LearningRates(L.Callback):
    def __init__(self, stop_at: int | None = None):
        self.lrs, self.stop_at = {}, stop_at

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.stop_at:
            raise Killed
        self.lrs[trainer.current_epoch] = trainer.optimizers[0].param_groups[0]["lr"]


def test_swa_resumed_mid_annealing_keeps_its_schedule_and_average(tmp_path):
    """SWA's average, counters and SWALR come back from the checkpoint (its callback state)."""
    data = TensorDataset(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 2)

    def run(folder, stop_at=None, resume=False):
        line, lrs = Line(), LearningRates(stop_at)
        swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1, annealing_epochs=3)
        trainer = L.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, plugins=[AtomicCheckpointIO()],
                            callbacks=[swa, lrs, ResumeCheckpoint(folder)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(line, DataLoader(data, batch_size=4), ckpt_path=folder / "last.ckpt" if resume else None)
        return lrs.lrs, line.net.weight.detach().clone()

    lrs, weights = run(tmp_path / "whole")
    with pytest.raises(Killed):
        run(tmp_path / "run", stop_at=2)  # epoch 1 averaged, half-way through SWALR's annealing
    resumed_lrs, resumed_weights = run(tmp_path / "run", resume=True)
    assert resumed_lrs == pytest.approx({k: v for k, v in lrs.items() if k >= 2}, abs=1e-12)
    torch.testing.assert_close(resumed_weights, weights, rtol=0, atol=1e-7)


# --- restore_epoch_files: the run folder made to agree with the checkpoint ----------------------------------------

ROW = {"train_loss": 1.0, "train_acc": 0.5, "val_acc": 0.5, "lr": 0.1, "seconds": 1.0}
WEIGHT = {"model.net.fc.weight": torch.full((2, 3), 2.0)}


def committed(run, *, epochs: int, best_epoch: int, history: int, best_label: int | None) -> None:
    """A run folder whose checkpoint holds `epochs` epochs (best: `best_epoch`), with `history` rows in
    history.csv and best weights labelled `best_label` (None: no file)."""
    rows = [{"epoch": e, **ROW, "val_loss": 1.0 / e} for e in range(1, epochs + 1)]
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": WEIGHT, "loops": {}, "epoch": epochs - 1, "callbacks": {
        "ResumeCheckpoint": {"epoch": epochs, "stopped": False}, "HistoryWriter": {"rows": rows},
        "BestWeights": {"best_epoch": best_epoch, "best_score": 0.5}}}, run / "checkpoints" / "last.ckpt")
    write_history([{"epoch": e, **ROW, "val_loss": 9.0} for e in range(1, history + 1)], run / "history.csv")
    if best_label is not None:
        save_file({"fc.weight": torch.zeros(2, 3)}, str(run / "checkpoints" / "best.safetensors"),
                  metadata={BEST_EPOCH_KEY: str(best_label)})


@pytest.mark.parametrize("history, best_label, best_epoch, said, best_after", [
    (3, 2, 2, "continues after epoch 2 (epoch 3 had not been committed and runs again)", 0.0),  # old order's leftover
    (1, None, 2, "continues after epoch 2", 2.0),  # killed after the commit, before the files: both rebuilt
    (2, 3, 2, "continues after epoch 2", 2.0),  # weights of an epoch the checkpoint does not hold: rebuilt
    (2, 1, 1, "continues after epoch 2", 0.0),  # the best of an earlier epoch, as committed
])
def test_history_and_best_weights_are_rewritten_from_the_checkpoint(tmp_path, history, best_label, best_epoch, said,
                                                                    best_after):
    committed(tmp_path, epochs=2, best_epoch=best_epoch, history=history, best_label=best_label)
    (tmp_path / "checkpoints" / ".last.0123456789ab.tmp.ckpt").write_bytes(b"half")  # a killed checkpoint write
    assert restore_epoch_files(tmp_path) == said
    assert [(r["epoch"], r["val_loss"]) for r in read_history(tmp_path / "history.csv")] == [(1, 1.0), (2, 0.5)]
    best = tmp_path / "checkpoints" / "best.safetensors"
    assert best_file_epoch(best) == best_epoch and float(load_file(str(best))["fc.weight"][0, 0]) == best_after
    assert not list((tmp_path / "checkpoints").glob(".*.tmp*"))


@pytest.mark.parametrize("history, best_label, best_epoch, message", [
    (4, 1, 1, r"history.csv has 4 epochs but .*last.ckpt holds 2, so the checkpoint is older than the run"),
    (2, 2, 1, r"best.safetensors holds epoch 2 but the checkpoint's best is epoch 1, whose weights are gone"),
    (2, None, 1, r"best.safetensors is missing but the checkpoint's best is epoch 1"),
])
def test_files_that_cannot_belong_to_the_checkpoint_are_one_line(tmp_path, history, best_label, best_epoch, message):
    committed(tmp_path, epochs=2, best_epoch=best_epoch, history=history, best_label=best_label)
    with pytest.raises(DataError, match=rf"^--resume {re.escape(str(tmp_path))}: .*{message}.*; start again with") as error:
        restore_epoch_files(tmp_path)
    assert "\n" not in str(error.value)


# --- a smaller batch with gradient accumulation; out of memory ----------------------------------------------------


def test_resume_takes_a_smaller_batch_only_with_accumulation_keeping_the_effective_batch(tmp_path):
    settings(batch_size=8, accumulate=1).write_yaml(tmp_path / "config.yaml")
    resolve = lambda **flags: resolve_train_config(out=None, resume=tmp_path, config_file=None, overrides=flags)  # noqa: E731
    config, _ = resolve(batch_size=4, accumulate="2")  # --set values arrive as text
    assert (config.batch_size, config.accumulate) == (4, 2)
    with pytest.raises(ConfigError, match=r"--batch-size 4 x --accumulate 1 changes the run's effective batch of 8 "
                                          r"\(8 x 1\); keep the product, e.g. --batch-size 4 --accumulate 2$"):
        resolve(batch_size=4)
    with pytest.raises(ConfigError, match="--accumulate: got 0"):
        TrainConfig(accumulate=0).validate()


def test_a_resume_with_half_the_batch_and_two_accumulated_takes_the_same_optimizer_steps(tmp_path, monkeypatch):
    with monkeypatch.context() as patches:
        install_kill("after-epoch", 1, die=die, patch=patches.setattr)
        with pytest.raises(Killed):
            train(tmp_path, settings())
    _, network = train(tmp_path, settings(batch_size=2, accumulate=2), resume=True)
    assert network.trainer.global_step == 3 * 2  # 8 images, 4 per step, 3 epochs
    assert len(read_history(tmp_path / "history.csv")) == 3


@pytest.mark.parametrize("error, is_oom", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
])
def test_out_of_memory_is_told_from_other_runtime_errors(error, is_oom):
    assert is_out_of_memory(error) is is_oom


def test_out_of_memory_during_fit_is_one_line_naming_a_smaller_batch_and_the_resume(tmp_path, monkeypatch):
    def step(self, batch, batch_idx):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ClassifierModule, "training_step", step)
    with pytest.raises(ConfigError) as error:
        train(tmp_path, settings(batch_size=6, accumulate=2))
    assert str(error.value) == (
        f"out of memory while training with --batch-size 6: continue with a smaller batch and gradient accumulation "
        f"keeping the effective batch of 12: medtransfer train --resume {tmp_path} --batch-size 3 --accumulate 4"
    )
