"""Transfer-learning strategies: which parts of the backbone train.

- finetune: everything trains;
- freeze: the first N children (layers in forward order) are frozen, the rest trains
  (the classic "fixed feature extractor" of the chest X-ray script is N=4 on resnet18:
  conv1, bn1, relu, maxpool);
- linear-probe: only the new head trains.

Frozen parts keep BatchNorm in eval mode (their running statistics stay the pretrained
ones) and, being a prefix of the network, run without autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medtransfer.errors import ConfigError
from medtransfer.models.backbones import BackboneSpec

STRATEGIES = ("finetune", "freeze", "linear-probe")


def backbone_children(net: nn.Module, spec: BackboneSpec) -> list[str]:
    """Dotted names of the backbone's layers in forward order, head excluded."""
    names = []
    for name, child in net.named_children():
        if name in spec.expand:
            names.extend(f"{name}.{sub}" for sub, _ in child.named_children())
        else:
            names.append(name)
    head_root = spec.head.split(".")[0]
    return [n for n in names if n != spec.head and n != head_root]


class TransferModel(nn.Module):
    """The backbone with its new head, plus the record of what is frozen."""

    def __init__(self, net: nn.Module, spec: BackboneSpec, frozen: list[str] | None = None):
        super().__init__()
        self.net = net
        self.spec = spec
        self.frozen: list[str] = []
        self.freeze(frozen or [])

    def freeze(self, names: list[str]) -> None:
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
    def head(self) -> nn.Linear:
        return self.net.get_submodule(self.spec.head)

    def parameter_counts(self) -> dict[str, int]:
        return {
            "total": sum(p.numel() for p in self.parameters()),
            "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
        }


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
        if self.name == "finetune":
            return []
        if self.name == "linear-probe":
            return children
        if self.freeze_children > len(children):
            raise ConfigError(
                f"--freeze-children: got {self.freeze_children}; {spec.name} has {len(children)} children before "
                f"the head ({', '.join(children)}); choose 0-{len(children)}"
            )
        return children[: self.freeze_children]


def build_transfer_model(net: nn.Module, spec: BackboneSpec, strategy: Strategy) -> TransferModel:
    return TransferModel(net, spec, strategy.frozen_children(net, spec))
