"""Gradient class activation maps: layer choice, hooks, heads, frozen backbones, a known answer."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

from medtransfer.errors import ConfigError
from medtransfer.explain import cam as cam_module
from medtransfer.explain.cam import METHODS, ClassActivationMap
from medtransfer.models.backbones import create_backbone, list_backbones
from medtransfer.models.strategies import Strategy, build_transfer_model


class TinyNet(nn.Module):
    """conv -> relu -> conv -> global average pool -> Linear(8, outputs)."""

    def __init__(self, outputs: int = 1):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


LAYER_METHODS = tuple(m for m in METHODS if m != "occlusion")  # the methods that read a feature map


# LayerCAM's default: the last stride-16 stage, one map cell per 16 px
STRIDE_16 = {"resnet18": "layer3", "resnet50": "layer3", "densenet121": "features.denseblock3", "efficientnet_lite0": "blocks.4"}


@pytest.mark.parametrize("method", LAYER_METHODS)
@pytest.mark.parametrize("name", list_backbones())
def test_automatic_layer_is_the_spec_cam_layer_for_every_backbone(name, method, transfer_model):
    model = transfer_model(name)
    images = torch.randn(2, 3, 64, 64)
    with ClassActivationMap(model, method=method) as cam:
        result = cam(images)
    assert cam.target_layer == (STRIDE_16[name] if method == "layercam" else model.spec.cam_layer)
    assert result.map_cells == ((4, 4) if method == "layercam" else (2, 2))
    assert result.maps.shape == (2, 64, 64)
    assert torch.isfinite(result.maps).all()
    assert result.maps.min() >= 0 and result.maps.max() <= 1
    assert result.class_index.tolist() == result.logits.argmax(dim=1).tolist()


def test_automatic_layer_without_spec_is_the_last_spatial_module():
    import torchvision

    with ClassActivationMap(torchvision.models.resnet18(weights=None, num_classes=2)) as cam:
        assert cam.target_layer == "layer4"
    with ClassActivationMap(TinyNet()) as cam:
        assert cam.target_layer == "features"


def test_hooks_are_removed_after_the_block_and_after_an_exception(transfer_model, hooks_left):
    model = transfer_model("resnet18")
    with ClassActivationMap(model, method="gradcam") as cam:
        assert hooks_left(model)  # the hook is there while active
        cam(torch.randn(1, 3, 64, 64))
    assert hooks_left(model) == []
    with pytest.raises(RuntimeError, match="boom"):
        with ClassActivationMap(model, method="gradcam++") as cam:
            cam(torch.randn(1, 3, 64, 64))
            raise RuntimeError("boom")
    assert hooks_left(model) == []
    with pytest.raises(ValueError, match="N x C x H x W"):
        with ClassActivationMap(model) as cam:
            cam(torch.randn(3, 64, 64))
    assert hooks_left(model) == []


def test_calling_outside_the_block_is_refused():
    cam = ClassActivationMap(TinyNet())
    with pytest.raises(RuntimeError, match="context manager"):
        cam(torch.randn(1, 3, 16, 16))


def test_single_logit_head_class_zero_is_the_reverse_of_class_one():
    torch.manual_seed(1)
    model = TinyNet(outputs=1)
    images = torch.randn(2, 3, 24, 24)
    with ClassActivationMap(model, method="cam") as cam:
        one = cam(images, class_index=1)
        zero = cam(images, class_index=0)
        default = cam(images)
    assert not torch.allclose(one.maps, zero.maps)
    torch.testing.assert_close(zero.maps, 1 - one.maps, atol=1e-5, rtol=0)  # -w reverses the emphasis
    assert default.class_index.tolist() == (one.logits[:, 0] >= 0).long().tolist()
    assert one.probabilities.shape == (2, 2)
    torch.testing.assert_close(one.probabilities[:, 1], torch.sigmoid(one.logits[:, 0]))
    with ClassActivationMap(model, method="gradcam") as cam:
        grad_one, grad_zero = cam(images, class_index=1), cam(images, class_index=0)
    assert grad_one.maps.shape == (2, 24, 24)
    assert not torch.allclose(grad_one.maps, grad_zero.maps)
    with ClassActivationMap(model, method="occlusion") as cam:
        occluded_one, occluded_zero = cam(images, class_index=1), cam(images, class_index=0)
    assert occluded_one.probabilities.shape == (2, 2)
    # a patch that lowers the logit is evidence for class 1 and against class 0: the clipped maps do not overlap
    assert ((occluded_one.maps > 0) & (occluded_zero.maps > 0)).sum() == 0


def test_bad_target_layer_lists_candidates(transfer_model):
    with pytest.raises(ConfigError, match=r"'layer9'.*no such layer in resnet18.*candidates: layer4, layer3"):
        ClassActivationMap(transfer_model("resnet18"), target_layer="layer9")


def test_unknown_method_lists_choices():
    with pytest.raises(ConfigError, match="gradcam\\+\\+"):
        ClassActivationMap(TinyNet(), method="lime")


def test_explicit_layer_names_relative_to_net_or_model(transfer_model):
    model = transfer_model("resnet18")
    for name in ("layer3", "net.layer3"):
        with ClassActivationMap(model, target_layer=name) as cam:
            assert cam(torch.randn(1, 3, 64, 64)).maps.shape == (1, 64, 64)


def test_frozen_backbone_still_gets_gradcam_and_flags_and_modes_are_restored():
    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = build_transfer_model(net, spec, Strategy("linear-probe"))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["net.fc.weight", "net.fc.bias"]
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    with ClassActivationMap(model, method="gradcam") as cam:
        result = cam(torch.randn(2, 3, 96, 96))
    assert result.maps.std(dim=(1, 2)).min() > 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated


def test_known_answer_bright_square_is_the_maximum(mean_of_feature):
    image = torch.zeros(1, 1, 64, 64)
    image[..., 8:24, 40:56] = 1.0  # top-right quadrant
    for method in METHODS:
        with ClassActivationMap(mean_of_feature(), method=method) as cam:
            result = cam(image, class_index=1)
        row, col = divmod(int(result.maps[0].argmax()), 64)
        assert row < 32 <= col, (method, row, col)
        assert result.maps[0, 56:, :8].max() == 0  # the far corner carries no evidence


def test_constant_map_is_zeros_not_nan(mean_of_feature):
    with ClassActivationMap(mean_of_feature(), method="gradcam") as cam:
        result = cam(torch.zeros(1, 1, 32, 32), class_index=1)
    assert torch.equal(result.maps, torch.zeros(1, 32, 32))


def test_docstring_examples_run():
    failures, tried = doctest.testmod(cam_module)
    assert tried > 0 and failures == 0


class StridedOnes(nn.Module):
    """Three 3x3 stride-2 all-ones convolutions (symmetric padding): cell i looks at pixel 8 i."""

    def __init__(self) -> None:
        super().__init__()
        layers = []
        for channels_in in (1, 16, 16):
            conv = nn.Conv2d(channels_in, 16, 3, stride=2, padding=1, bias=False)
            nn.init.ones_(conv.weight)
            layers += [conv, nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-1.0] * 16, [1.0] * 16]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.mark.parametrize("method", LAYER_METHODS)
def test_map_peak_lands_on_the_pixel_the_cell_sees(method):
    # An impulse at (40, 24) reaches exactly one stride-8 cell, (5, 3). The usual resize
    # (align_corners=False) would draw that cell at (43.5, 27.5), half a cell off.
    image = torch.zeros(1, 1, 64, 64)
    image[0, 0, 40, 24] = 1.0
    with ClassActivationMap(StridedOnes(), method=method, target_layer="features") as cam:
        result = cam(image, class_index=1)
    assert cam.grid.stride == 8 and result.map_cells == (8, 8)
    row, col = divmod(int(result.maps[0].argmax()), 64)
    assert abs(row - 40) <= 1 and abs(col - 24) <= 1, (row, col)


class SlopeChange(nn.Module):
    """1 x 1 identity conv (the target layer), then a score that rises with values up to 0.7 and falls above.

    An opacity at 0.5 raises the score; a brighter patch at 0.9 lowers it. Grad-CAM's one
    weight per channel scales the whole map, so its maximum is the brightest patch; LayerCAM
    weighs each position by its own gradient.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.ones_(self.features.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        evidence = (torch.relu(a) - 2 * torch.relu(a - 0.7)).mean(dim=(1, 2, 3))
        return torch.stack([-evidence, evidence], dim=1)


def test_layercam_points_at_the_lesion_where_gradcam_points_at_a_brighter_distractor():
    image = torch.zeros(1, 1, 32, 32)
    image[..., 4:14, 4:14] = 0.5  # the lesion: raises the class-1 score
    image[..., 22:26, 22:26] = 0.9  # brighter, smaller, lowers it
    peaks = {}
    for method in ("gradcam", "layercam"):
        with ClassActivationMap(SlopeChange(), method=method, target_layer="features") as cam:
            maps = cam(image, class_index=1).maps[0]
        peaks[method] = divmod(int(maps.argmax()), 32)
        if method == "layercam":
            assert maps[22:26, 22:26].max() == 0 and maps[4:14, 4:14].min() == 1  # all of the lesion, nothing else
    assert 22 <= peaks["gradcam"][0] < 26 and 22 <= peaks["gradcam"][1] < 26
    assert 4 <= peaks["layercam"][0] < 14 and 4 <= peaks["layercam"][1] < 14


def test_layercam_without_a_stride_16_layer_explains_the_last_layer():
    with ClassActivationMap(TinyNet(), method="layercam") as cam:  # stride 2 only
        assert cam.target_layer == "features"
    with ClassActivationMap(TinyNet(), method="layercam", target_layer="features.0") as cam:
        assert cam(torch.randn(1, 3, 16, 16)).map_cells == (16, 16)
