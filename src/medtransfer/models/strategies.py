"""Transfer-learning strategies: which parts of the backbone train.

- finetune: everything trains;
- freeze: the first N children (layers in forward order) are frozen, the rest trains
  (the classic "fixed feature extractor" of the chest X-ray script is N=4 on resnet18:
  conv1, bn1, relu, maxpool);
- linear-probe: only the new head trains;
- lp-ft: LP-FT (Kumar et al., ICLR 2022): the head first trains on frozen features (a
  linear probe of `lp_epochs`), then everything fine-tunes from that head, so the
  pretrained features are not distorted by the gradients of a random head;
- gradual: gradual unfreezing (ULMFiT): the head trains alone, then one child group is
  unfrozen every `unfreeze_every` epochs from the head down
  (:class:`medtransfer.train.callbacks.GradualUnfreezing`).

Layer-wise learning rates (:func:`parameter_groups`) scale each child group's learning
rate by `lr_decay` per group from the head down, with any strategy.

Frozen parts keep BatchNorm in eval mode (their running statistics stay the pretrained
ones) and, being a prefix of the network, run without autograd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from medtransfer.errors import ConfigError
from medtransfer.models.backbones import BackboneSpec
from medtransfer.models.heads import HEAD_BLOCK, MLPHead, apply_head, head_modules

STRATEGIES = ("finetune", "freeze", "linear-probe", "lp-ft", "gradual")


def backbone_children(net: nn.Module, spec: BackboneSpec) -> list[str]:
    """Dotted names of the backbone's layers in forward order, head excluded."""
    names: list[str] = []
    for name, child in net.named_children():
        if name in spec.expand:
            names.extend(f"{name}.{sub}" for sub, _ in child.named_children())
        else:
            names.append(name)
    head_root = spec.head.split(".")[0]
    return [n for n in names if n not in (spec.head, head_root, HEAD_BLOCK)]


class TransferModel(nn.Module):
    """The backbone with its new head, plus the record of what is frozen."""

    def __init__(self, net: nn.Module, spec: BackboneSpec, frozen: list[str] | None = None):
        super().__init__()
        self.net = net
        self.spec = spec
        self.frozen: list[str] = []
        self.freeze(frozen or [])

    def freeze(self, names: list[str]) -> None:
        """Freeze exactly the children `names`; everything else (the head always) trains."""
        for parameter in self.net.parameters():
            parameter.requires_grad_(True)
        for name in names:
            for parameter in self.net.get_submodule(name).parameters():
                parameter.requires_grad_(False)
        self.frozen = list(names)
        self.train(self.training)

    def train(self, mode: bool = True) -> "TransferModel":
        super().train(mode)
        for name in self.frozen:  # frozen BatchNorm keeps its pretrained statistics
            self.net.get_submodule(name).eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    @property
    def head(self) -> nn.Linear | MLPHead:
        """The classifier at spec.head (Linear, or MLPHead with the same in/out_features)."""
        return cast("nn.Linear | MLPHead", self.net.get_submodule(self.spec.head))

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def parameter_counts(self) -> dict[str, int]:
        return {
            "total": sum(p.numel() for p in self.parameters()),
            "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "head": sum(p.numel() for m in head_modules(self.net, self.spec) for p in m.parameters()),
        }

    def child_groups(self) -> list[str]:
        """Backbone children that hold parameters, from the head down (the units of lr decay and unfreezing)."""
        children = reversed(backbone_children(self.net, self.spec))
        return [n for n in children if any(True for _ in self.net.get_submodule(n).parameters())]


@dataclass(frozen=True)
class Strategy:
    """A strategy by name; an unknown name or a negative count is refused on construction."""

    name: str = "finetune"
    freeze_children: int = 4

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ConfigError(f"--strategy: got {self.name!r}; choose one of {', '.join(STRATEGIES)}")
        if self.freeze_children < 0:
            raise ConfigError(f"--freeze-children: got {self.freeze_children}; expected 0 or more")

    def frozen_children(self, net: nn.Module, spec: BackboneSpec) -> list[str]:
        children = backbone_children(net, spec)
        if self.name in ("finetune", "lp-ft"):  # lp-ft: the probe phase freezes on its own
            return []
        if self.name in ("linear-probe", "gradual"):  # gradual: GradualUnfreezing thaws them during training
            return children
        if self.freeze_children > len(children):
            raise ConfigError(
                f"--freeze-children: got {self.freeze_children}; {spec.name} has {len(children)} children before "
                f"the head ({', '.join(children)}); choose 0-{len(children)}"
            )
        return children[: self.freeze_children]


def build_transfer_model(net: nn.Module, spec: BackboneSpec, strategy: Strategy, head: str = "linear") -> TransferModel:
    """The network with the head called `head` (models/heads.py) and the strategy's children frozen."""
    apply_head(net, spec, head)
    return TransferModel(net, spec, strategy.frozen_children(net, spec))


def parameter_groups(model: TransferModel, lr: float, decay: float = 1.0) -> list[dict]:
    """Optimizer groups of the trainable parameters: the head at `lr`, then each child group
    from the head down at lr * decay**k (discriminative learning rates, ULMFiT). decay 1.0: one lr.

    Each group carries its "name" (the child, or "head"), so a callback can find it again.
    """
    groups: list[dict[str, Any]] = [{"name": "head", "params": [p for m in head_modules(model.net, model.spec) for p in m.parameters()]}]
    groups += [{"name": name, "params": list(model.net.get_submodule(name).parameters())} for name in model.child_groups()]
    grouped = {id(p) for group in groups for p in group["params"]}
    groups[0]["params"] += [p for p in model.net.parameters() if id(p) not in grouped]  # outside any child: head's lr
    out = []
    for depth, group in enumerate(groups):
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            out.append({"name": group["name"], "params": params, "lr": lr * decay**depth})
    return out
