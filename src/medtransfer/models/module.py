"""LightningModule: loss, optimiser, schedule and logging around a plain TransferModel."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from medtransfer.models.mixing import mix_batch
from medtransfer.models.strategies import TransferModel, parameter_groups
from medtransfer.task import SINGLE_LABEL, Task

LOSSES = ("cross-entropy", "focal")  # focal: ClassifierModule(focal_gamma > 0)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up, then cosine decay to 1% of the peak."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))


class ClassifierModule(L.LightningModule):
    class_weight: torch.Tensor | None  # a buffer (moves with the module), None without class weights

    def __init__(
        self,
        model: TransferModel,
        *,
        lr: float,
        weight_decay: float,
        warmup_epochs: int = 1,
        class_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        focal_gamma: float = 0.0,
        channels_last: bool = True,
        lr_decay: float = 1.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        task: Task | None = None,
    ):
        super().__init__()
        # The task decides the loss and what a hit is (medtransfer.task); without one: single-label classes.
        self.task = task or Task(SINGLE_LABEL, tuple(str(i) for i in range(model.num_classes)))
        self.model = model
        self.lr = lr
        self.lr_decay = lr_decay  # per child group from the head down (1.0: one learning rate)
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.focal_gamma = focal_gamma
        self.channels_last = channels_last
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weight", weight, persistent=False)
        self.label_smoothing = label_smoothing
        self.mixup, self.cutmix = mixup, cutmix  # Beta alphas (0: off), see models/mixing.py
        self._val_sums = torch.zeros(3, dtype=torch.float64)  # loss x images, hits, images (this rank)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy or focal (single-label); masked binary cross-entropy or focal per finding (multi-label).
        Class weights are per-class weights, or per-finding positive weights for multi-label."""
        return self.task.loss(
            logits, labels, weight=self.class_weight, focal_gamma=self.focal_gamma, label_smoothing=self.label_smoothing
        )

    def _step(self, batch, stage: str) -> torch.Tensor:
        images, labels = batch
        if stage == "train" and (self.mixup > 0 or self.cutmix > 0):
            mixed = mix_batch(images, labels, mixup=self.mixup, cutmix=self.cutmix)
            logits = self(mixed.images)
            # The loss of the soft target lam * y + (1 - lam) * y_partner (see models/mixing.py).
            loss = mixed.lam * self.loss(logits, labels) + (1 - mixed.lam) * self.loss(logits, mixed.partners)
            labels = labels if mixed.lam >= 0.5 else mixed.partners  # accuracy against the larger share
        else:
            logits = self(images)
            loss = self.loss(logits, labels)
        hits, decisions = self.task.hits(logits, labels)
        accuracy = hits.float() / decisions.clamp(min=1).float()
        if stage == "val":
            # Under DDP each rank validates its own shard (no padding: shards may differ by one image).
            # Sums of loss x images, hits and images are added over the ranks when the epoch ends, so
            # val/loss counts every validation image once and is the same number on every rank (early
            # stopping and the best epoch agree). Nothing is synced per step: ranks never wait on each other.
            sums = self._val_sums
            sums += torch.stack([loss.detach().to(sums) * len(labels), hits.to(sums) * len(labels) / decisions.clamp(min=1).to(sums),
                                 sums.new_tensor(len(labels))])
            return loss
        # Training shards are padded to equal size, so Lightning's sync_dist mean is exact.
        logged: dict[str, Any] = {"on_epoch": True, "prog_bar": True, "batch_size": len(labels), "sync_dist": True}
        self.log("train/loss", loss, on_step=True, **logged)
        self.log("train/acc", accuracy, on_step=False, **logged)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def on_validation_epoch_end(self) -> None:
        loss, hits, count = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum").tolist()
        count = max(count, 1.0)
        # Already the same on every rank; sync_dist only averages equal values (and silences Lightning's hint).
        self.log("val/loss", loss / count, prog_bar=True, sync_dist=True)
        self.log("val/acc", hits / count, prog_bar=True, sync_dist=True)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def configure_optimizers(self):
        groups = parameter_groups(self.model, self.lr, self.lr_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(1, total // max(1, self.trainer.max_epochs))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, warmup_steps=self.warmup_epochs * per_epoch, total_steps=total),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
