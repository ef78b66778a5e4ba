"""Training on two CPU processes (gloo, ddp_spawn), as Lightning's own tests run DDP inside pytest.

One process per device; each test spawns two. What a user notices: the run folder is the
one a single process writes, validation counts every image once, the ranks end with the
same weights, and test predictions have one row per image.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch.utils.data import Dataset

from medtransfer.config import TrainConfig
from medtransfer.data.datamodule import TransferDataModule
from medtransfer.models.backbones import create_backbone
from medtransfer.models.module import ClassifierModule
from medtransfer.models.strategies import Strategy, build_transfer_model
from medtransfer.train.fit import fit_with_lightning
from medtransfer.train.pipeline import run_training

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")


class Images(Dataset):
    def __init__(self, n: int, seed: int):
        self.images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        self.labels = [i % 2 for i in range(n)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


class ChecksumModule(ClassifierModule):
    """Writes a digest of its weights per rank when training ends (the test reads them back)."""

    def __init__(self, *args, folder: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.folder = folder

    def on_train_end(self) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        (self.folder / f"rank{self.global_rank}.sha256").write_text(digest.hexdigest())


def test_two_ranks_end_with_the_same_weights_and_validate_every_image_once(tmp_path):
    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    module = ChecksumModule(
        build_transfer_model(net, spec, Strategy("finetune", 0)), lr=1e-2, weight_decay=0.0, warmup_epochs=0,
        channels_last=False, folder=tmp_path,
    )
    val = Images(5, 1)  # odd: a padding sampler would count one image twice
    data = TransferDataModule(train=Images(12, 0), val=val, batch_size=4, num_workers=0)
    settings = TrainConfig(epochs=1, batch_size=4, progress=False, devices="2", distributed="ddp_spawn")

    fit = fit_with_lightning(module, data, settings, tmp_path / "run", accelerator="cpu", precision="32-true", resume=False)

    assert (fit.devices, fit.num_nodes, fit.distributed, fit.best_epoch) == (2, 1, "ddp_spawn", 1)
    digests = {p.name: p.read_text() for p in tmp_path.glob("rank*.sha256")}
    assert sorted(digests) == ["rank0.sha256", "rank1.sha256"] and len(set(digests.values())) == 1
    # The val loss the ranks agreed on (and early stopping saw) is the mean over all 5 images, each once.
    module.eval()
    with torch.no_grad():
        logits = module(val.images)
        expected = torch.nn.functional.cross_entropy(logits, torch.tensor(val.labels)).item()
    history = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    assert len(history) == 1 and math.isclose(float(history[0]["val_loss"]), expected, rel_tol=1e-4)


def folder_listing(run: Path) -> set[str]:
    """The run's files; gallery images are named after the cases they show, so only their folder counts."""
    files = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.parts}
    return {"plots/gallery/*" if f.startswith("plots/gallery/") else f for f in files}


@pytest.fixture
def data(make_kaggle_tree) -> Path:
    test = {"NORMAL": [f"IM-01{i:02d}-0001.jpeg" for i in range(3)],
            "PNEUMONIA": [f"person1{i:02d}_virus_1.jpeg" for i in range(4)]}
    return make_kaggle_tree({"train": {"NORMAL": 9, "PNEUMONIA": 9}, "test": test})


def test_a_two_process_run_writes_the_same_run_folder_as_one_process(data, tmp_path):
    settings = dict(data=str(data), backbone="resnet18", weights="none", image_size=16, cache_size=16, epochs=1,
                    batch_size=4, bootstrap=0, num_workers=0, progress=False, cache_dir=str(tmp_path / "cache"),
                    accelerator="cpu", precision="32-true", sampler="balanced",
                    strategy="freeze", freeze_children=4)  # frozen on every rank before DDP wraps the model
    single = run_training(TrainConfig.from_dict(settings), tmp_path / "one", console=Console(quiet=True))
    double = run_training(
        TrainConfig.from_dict({**settings, "devices": "2", "distributed": "ddp_spawn"}), tmp_path / "two",
        console=Console(quiet=True),
    )

    assert folder_listing(tmp_path / "two") == folder_listing(tmp_path / "one")
    one, two = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two"))
    assert list(two) == list(one) and list(two["val"]) == list(one["val"]) and two["params"] == one["params"]
    splits = [row["split"] for row in csv.DictReader((tmp_path / "two" / "split.csv").open())]
    assert two["val"]["n"] == splits.count("val") == single.val["n"]
    assert two["test"]["n"] == splits.count("test") == 7
    predictions = list(csv.DictReader((tmp_path / "two" / "predictions_test.csv").open()))
    assert len(predictions) == 7 and len({row["path"] for row in predictions}) == 7
    assert double.hardware | {"gpu": None} == {
        **double.hardware, "devices": 2, "num_nodes": 1, "world_size": 2, "distributed": "ddp_spawn",
        "accelerator": "cpu", "precision": "32-true", "gpu": None,
    }
    assert one["hardware"]["world_size"] == 1 and one["hardware"]["distributed"] == "none"
