"""Classification heads put on a backbone in place of its ImageNet classifier.

- linear: one Linear layer on the pooled features (the default);
- mlp: Linear -> ReLU -> Dropout -> Linear (MLP_HIDDEN units, MLP_DROPOUT);
- dwconv: a residual depthwise-separable convolution block on the last feature map
  (depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN), then the backbone's own pooling
  and a Linear layer. The block's last BatchNorm starts at zero scale, so the block is the
  identity at initialisation and the pretrained features reach the classifier unchanged.

The dwconv block lives in the network as ``net.head_block`` and runs as a forward hook on
the backbone's last feature module (``spec.cam_layer``): it works for every backbone
without rewriting their forward functions, and class activation maps on that layer see the
block's output, i.e. exactly the map the classifier pools. The hook is an object holding
the block, so ``copy.deepcopy`` of the network (weight averaging) hooks the copied block.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from medtransfer.errors import ConfigError
from medtransfer.models.backbones import BackboneSpec, _get_submodule_parent

HEADS = ("linear", "mlp", "dwconv")
HEAD_BLOCK = "head_block"  # attribute of the network holding the dwconv block
MLP_HIDDEN = 256
MLP_DROPOUT = 0.2

__all__ = ["HEADS", "HEAD_BLOCK", "MLPHead", "DepthwiseSeparableBlock", "apply_head", "head_modules", "check_head"]


def check_head(name: str) -> None:
    if name not in HEADS:
        raise ConfigError(f"--head: got {name!r}; choose one of {', '.join(HEADS)}")


class MLPHead(nn.Sequential):
    """One hidden layer; exposes in_features/out_features/weight like the Linear head it replaces."""

    def __init__(self, in_features: int, out_features: int, hidden: int = MLP_HIDDEN, dropout: float = MLP_DROPOUT):
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, out_features))
        self.in_features = in_features
        self.out_features = out_features

    @property
    def weight(self) -> torch.Tensor:  # the feature probe reads the head's device from it
        return cast(nn.Linear, self[0]).weight


class DepthwiseSeparableBlock(nn.Module):
    """x + BN(pointwise(ReLU(BN(depthwise3x3(x))))), identity at initialisation."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.pointwise(torch.relu(self.bn1(self.depthwise(x)))))


class _ApplyBlock:
    """Forward hook replacing a module's output by block(output); an object, so deepcopy follows the block."""

    def __init__(self, block: nn.Module):
        self.block = block

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return self.block(output)


def _feature_channels(net: nn.Module, spec: BackboneSpec, in_channels: int) -> int:
    """Channels of the map that spec.cam_layer outputs (one small forward pass)."""
    shapes = []
    hook = net.get_submodule(spec.cam_layer).register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, in_channels, 64, 64))
    finally:
        hook.remove()
        net.train(was_training)
    return int(shapes[-1][1])


def apply_head(net: nn.Module, spec: BackboneSpec, name: str) -> None:
    """Replace the Linear head that create_backbone put at spec.head by the head called `name`."""
    check_head(name)
    parent, attr = _get_submodule_parent(net, spec.head)
    linear = getattr(parent, attr)
    if name == "mlp":
        setattr(parent, attr, MLPHead(linear.in_features, linear.out_features))
    elif name == "dwconv":
        in_channels = cast(nn.Conv2d, net.get_submodule(spec.first_conv)).in_channels
        block = DepthwiseSeparableBlock(_feature_channels(net, spec, in_channels))
        net.add_module(HEAD_BLOCK, block)
        net.get_submodule(spec.cam_layer).register_forward_hook(_ApplyBlock(block))


def head_modules(net: nn.Module, spec: BackboneSpec) -> list[nn.Module]:
    """The modules that make up the head (the classifier, and the dwconv block when there is one)."""
    modules = [net.get_submodule(spec.head)]
    if hasattr(net, HEAD_BLOCK):
        modules.insert(0, getattr(net, HEAD_BLOCK))
    return modules
