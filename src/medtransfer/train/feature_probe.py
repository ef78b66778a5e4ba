"""Linear probe on cached backbone features.

With a frozen backbone and no augmentation, every epoch of a linear probe feeds the head
the same features. So compute them once (:func:`extract_features`) and train the head on
the resulting ``n x d`` matrix (:func:`train_head_on_features`): after the one feature
pass an epoch costs a few small matrix products instead of a backbone forward over
every image.

Example (tiny, random weights)::

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from medtransfer.models.backbones import create_backbone
    >>> from medtransfer.models.strategies import TransferModel
    >>> net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    >>> model = TransferModel(net, spec)
    >>> data = TensorDataset(torch.randn(6, 3, 32, 32), torch.tensor([0, 1] * 3))
    >>> x = extract_features(model, data, batch_size=4, device=torch.device("cpu"),
    ...                      precision="32-true", num_workers=0)
    >>> x.shape
    torch.Size([6, 512])
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medtransfer.runtime import autocast
from medtransfer.models.heads import MLPHead
from medtransfer.models.strategies import TransferModel
from medtransfer.task import SINGLE_LABEL, Task

__all__ = ["epoch_batches", "extract_features", "train_head_on_features"]


def _head_parent(model: TransferModel) -> tuple[nn.Module, str]:
    parent_path, _, attr = model.spec.head.rpartition(".")
    return (model.net.get_submodule(parent_path) if parent_path else model.net), attr


@torch.inference_mode()
def _features(
    model: TransferModel, dataset: Dataset, batch_size: int, device: torch.device, precision: str, num_workers: int
) -> torch.Tensor:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    chunks = []
    for batch in loader:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            chunks.append(model(images).float().flatten(1).cpu())
    if not chunks:
        raise ValueError("extract_features: the dataset is empty")
    return torch.cat(chunks)


def extract_features(
    model: TransferModel,
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    num_workers: int,
) -> torch.Tensor:
    """The backbone's pooled features (float32, ``n x d`` on the CPU) in dataset order.

    The head is replaced by ``nn.Identity`` for the pass and put back afterwards (also
    when the pass fails); the model runs in eval mode and gets its train/eval mode back
    (it stays on ``device``, in channels_last memory format, as after ``predict_logits``).
    ``dataset`` yields ``(image, label)`` pairs (or bare images).
    """
    parent, attr = _head_parent(model)
    head = getattr(parent, attr)
    was_training = model.training
    setattr(parent, attr, nn.Identity())
    try:
        model.eval().to(device).to(memory_format=torch.channels_last)
        return _features(model, dataset, batch_size, device, precision, num_workers)
    finally:
        setattr(parent, attr, head)
        model.train(was_training)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's shuffled mini-batches of indices (the order :func:`train_head_on_features` uses)."""
    return list(torch.randperm(n, generator=generator).split(batch_size))


def _check_pair(name: str, x: torch.Tensor, y: torch.Tensor, width: int) -> None:
    if x.ndim != 2 or x.shape[1] != width:
        raise ValueError(f"{name}_x: expected n x {width} features, got {tuple(x.shape)}")
    if y.ndim not in (1, 2) or len(y) != len(x):  # 2-D: multi-label targets
        raise ValueError(f"{name}_y: expected {len(x)} labels, got shape {tuple(y.shape)}")
    if len(x) == 0:
        raise ValueError(f"{name}_x: no rows")


@torch.no_grad()
def _evaluate(head: nn.Linear | MLPHead, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, task: Task) -> tuple[float, float]:
    logits = head(x)
    loss = task.loss(logits, y, weight=weight)
    hits, count = task.hits(logits, y)
    return float(loss), float(hits) / max(1.0, float(count))


def train_head_on_features(
    head: nn.Linear | MLPHead,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    class_weights: Sequence[float] | torch.Tensor | None = None,
    patience: int | None = None,
    seed: int = 0,
    task: Task | None = None,
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Train ``head`` in place on precomputed features with AdamW (constant learning rate).

    Mini-batches are drawn by :func:`epoch_batches` from a generator seeded with ``seed``,
    so a given head and seed always give the same result. Training stops early after
    ``patience`` epochs without a lower validation loss.

    Returns:
        ``(history, best_state)``: one row per epoch with the columns of history.csv
        (epoch, train_loss, train_acc, val_loss, val_acc, lr, seconds), and a copy of the
        head's state dict at the epoch with the lowest validation loss. The head itself
        is left at its last epoch.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = head.weight.device
    train_x, val_x = train_x.to(device, torch.float32), val_x.to(device, torch.float32)
    task = task or Task(SINGLE_LABEL, tuple(str(i) for i in range(head.out_features)))
    target_type = torch.float32 if task.multilabel else torch.long
    train_y, val_y = train_y.to(device, target_type), val_y.to(device, target_type)
    _check_pair("train", train_x, train_y, head.in_features)
    _check_pair("val", val_x, val_y, head.in_features)
    weight = _class_weight(class_weights, head)

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    history: list[dict] = []
    best_loss, best_state, since_best = math.inf, copy.deepcopy(head.state_dict()), 0
    head.train()
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        train_loss, train_acc = _train_epoch(head, optimizer, train_x, train_y, weight, batch_size, generator, task)
        val_loss, val_acc = _evaluate(head, val_x, val_y, weight, task)
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - started,
            }
        )
        if val_loss < best_loss:
            best_loss, since_best = val_loss, 0
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        else:
            since_best += 1
            if patience is not None and since_best >= patience:
                break
    return history, best_state


def _class_weight(class_weights: Sequence[float] | torch.Tensor | None, head: nn.Linear | MLPHead) -> torch.Tensor | None:
    if class_weights is None:
        return None
    weight = torch.as_tensor(class_weights, dtype=torch.float32, device=head.weight.device)
    if weight.shape != (head.out_features,):
        raise ValueError(f"class_weights: expected {head.out_features} values, got shape {tuple(weight.shape)}")
    return weight


def _train_epoch(
    head: nn.Linear | MLPHead,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor | None,
    batch_size: int,
    generator: torch.Generator,
    task: Task,
) -> tuple[float, float]:
    """One pass over the mini-batches of :func:`epoch_batches`; the mean loss and the accuracy."""
    loss_sum, correct, decisions = 0.0, 0, 0
    for index in epoch_batches(len(x), batch_size, generator):
        index = index.to(x.device)
        logits = head(x[index])
        loss = task.loss(logits, y[index], weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * len(index)
        hits, count = task.hits(logits, y[index])
        correct, decisions = correct + int(hits), decisions + int(count)
    return loss_sum / len(x), correct / max(1, decisions)
