"""Class activation maps: layer choice, hooks, heads, frozen backbones, a known answer, files."""

from __future__ import annotations

import doctest
import functools

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medtransfer.artifacts import load_model, model_info, save_model
from medtransfer.errors import ConfigError
from medtransfer.explain import cam as cam_module
from medtransfer.explain.cam import LAYER_FREE, METHODS, ClassActivationMap, explain_files, overlay, save_overlay
from medtransfer.models.backbones import create_backbone, list_backbones
from medtransfer.models.strategies import Strategy, TransferModel, build_transfer_model


@functools.cache
def _transfer_model(name: str) -> TransferModel:
    torch.manual_seed(0)
    net, spec = create_backbone(name, num_classes=2, weights="none")
    return TransferModel(net, spec)


def _hooks_left(model: nn.Module) -> list[str]:
    kinds = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
    )
    return [f"{name}.{kind}" for name, module in model.named_modules() for kind in kinds if getattr(module, kind, None)]


class TinyNet(nn.Module):
    """conv -> relu -> conv -> global average pool -> Linear(8, outputs)."""

    def __init__(self, outputs: int = 1):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class MeanOfFeature(nn.Module):
    """Logit of class 1 = mean of a fixed 4x4 box filter of the image; class 0 = its negation."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 4, stride=4, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 16)
            self.fc.weight.copy_(torch.tensor([[-1.0], [1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).flatten(1))


LAYER_METHODS = tuple(m for m in METHODS if m != "occlusion")  # the methods that read a feature map


@pytest.mark.parametrize("method", LAYER_METHODS)
@pytest.mark.parametrize("name", list_backbones())
def test_automatic_layer_is_the_spec_cam_layer_for_every_backbone(name, method):
    model = _transfer_model(name)
    images = torch.randn(2, 3, 64, 64)
    with ClassActivationMap(model, method=method) as cam:
        result = cam(images)
    assert cam.target_layer == model.spec.cam_layer
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


def test_hooks_are_removed_after_the_block_and_after_an_exception():
    model = _transfer_model("resnet18")
    with ClassActivationMap(model, method="gradcam") as cam:
        assert _hooks_left(model)  # the hook is there while active
        cam(torch.randn(1, 3, 64, 64))
    assert _hooks_left(model) == []
    with pytest.raises(RuntimeError, match="boom"):
        with ClassActivationMap(model, method="gradcam++") as cam:
            cam(torch.randn(1, 3, 64, 64))
            raise RuntimeError("boom")
    assert _hooks_left(model) == []
    with pytest.raises(ValueError, match="N x C x H x W"):
        with ClassActivationMap(model) as cam:
            cam(torch.randn(3, 64, 64))
    assert _hooks_left(model) == []


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


def test_bad_target_layer_lists_candidates():
    with pytest.raises(ConfigError, match=r"'layer9'.*no such layer in resnet18.*candidates: layer4, layer3"):
        ClassActivationMap(_transfer_model("resnet18"), target_layer="layer9")


def test_unknown_method_lists_choices():
    with pytest.raises(ConfigError, match="gradcam\\+\\+"):
        ClassActivationMap(TinyNet(), method="lime")


def test_explicit_layer_names_relative_to_net_or_model():
    model = _transfer_model("resnet18")
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


def test_known_answer_bright_square_is_the_maximum():
    image = torch.zeros(1, 1, 64, 64)
    image[..., 8:24, 40:56] = 1.0  # top-right quadrant
    for method in METHODS:
        with ClassActivationMap(MeanOfFeature(), method=method) as cam:
            result = cam(image, class_index=1)
        row, col = divmod(int(result.maps[0].argmax()), 64)
        assert row < 32 <= col, (method, row, col)
        assert result.maps[0, 56:, :8].max() == 0  # the far corner carries no evidence


def test_constant_map_is_zeros_not_nan():
    with ClassActivationMap(MeanOfFeature(), method="gradcam") as cam:
        result = cam(torch.zeros(1, 1, 32, 32), class_index=1)
    assert torch.equal(result.maps, torch.zeros(1, 32, 32))


def test_overlay_and_save_overlay(tmp_path):
    gray = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))
    heat = np.zeros((32, 32))
    heat[:16] = 1.0
    rgb = overlay(gray, heat, alpha=0.5)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    assert rgb[:16, :, 0].mean() > rgb[16:, :, 0].mean()  # hot is red, cold is blue
    path = save_overlay(tmp_path / "o.png", gray, heat, "PNEUMONIA p=0.93 (threshold 0.41)")
    picture = np.asarray(Image.open(path))
    assert picture.shape[0] > 32 and picture.shape[1] >= 32
    left = (picture.shape[1] - 32) // 2
    assert np.array_equal(picture[:32, left : left + 32], overlay(gray, heat))
    with pytest.raises(ValueError, match="same shape"):
        overlay(gray, heat[:10])


def test_explain_files_writes_overlays_and_maps(tmp_path):
    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = TransferModel(net, spec)
    info = model_info(model, classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", threshold=0.41,
                      temperature=1.5, image_size=64, decode_size=72)
    save_model(model, info, tmp_path / "run")
    saved = load_model(tmp_path / "run")
    rng = np.random.default_rng(0)
    paths = [tmp_path / "a.png", tmp_path / "b.jpg"]
    Image.fromarray(rng.integers(0, 255, (90, 120), dtype=np.uint8), mode="L").save(paths[0])
    Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8), mode="RGB").save(paths[1])

    rows = explain_files(saved, paths, tmp_path / "out", method="gradcam", batch_size=1)

    assert [r["path"] for r in rows] == [str(p) for p in paths]
    for row, stem in zip(rows, ("a", "b")):
        assert row["overlay"] == tmp_path / "out" / f"{stem}_gradcam.png"
        assert row["map"] == tmp_path / "out" / f"{stem}_gradcam.npy"
        heat = np.load(row["map"])
        assert heat.shape == (64, 64) and heat.dtype == np.float32
        assert heat.min() >= 0 and heat.max() <= 1
        picture = Image.open(row["overlay"])
        assert picture.mode == "RGB" and picture.height > 64 and picture.width >= 64
        p_pos = row["probabilities"]["PNEUMONIA"]
        assert row["predicted"] == ("PNEUMONIA" if p_pos >= 0.41 else "NORMAL")
        assert row["probability"] == pytest.approx(row["probabilities"][row["predicted"]])
    # the probability is the temperature-scaled softmax of the model's logits
    transform = saved.transform()
    from medtransfer.data.decode import decode_image
    from medtransfer.data.datamodule import image_tensor

    x = transform(image_tensor(np.array(decode_image(paths[0], size=72))))[None]
    with torch.no_grad():
        expected = torch.softmax(saved.model(x) / 1.5, dim=1)[0, 1].item()
    assert rows[0]["probabilities"]["PNEUMONIA"] == pytest.approx(expected, abs=1e-5)


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


@pytest.mark.parametrize(
    ("name", "expected_offset"),
    # ResNet/EfficientNet: odd kernels with symmetric padding put cell i at 32 i. DenseNet's
    # three 2x2 average-pool transitions each add half their input stride: 2 + 4 + 8 = 14.
    [("resnet18", 0.0), ("efficientnet_lite0", 0.0), ("densenet121", 14.0)],
)
def test_feature_grid_of_registered_backbones(name, expected_offset):
    model = _transfer_model(name)
    grid = cam_module.feature_grid(model.net, model.spec.cam_layer)
    assert grid.stride == 32
    assert grid.offset_y == pytest.approx(expected_offset, abs=3)
    assert grid.offset_x == pytest.approx(expected_offset, abs=3)


def test_upsample_places_cells_at_grid_centres_and_holds_the_border():
    cells = torch.zeros(1, 3, 3)
    cells[0, 1, 2] = 1.0
    grid = cam_module.FeatureGrid(stride=10.0, offset_y=2.0, offset_x=2.0)
    maps = cam_module.upsample(cells, (30, 30), grid)
    assert maps[0, 12, 22] == pytest.approx(1.0)  # cell (1, 2) is centred on pixel (2 + 10, 2 + 20)
    assert maps[0, 12, 29] == pytest.approx(1.0)  # beyond the last centre the border value is held
    assert maps[0, 12, 17] == pytest.approx(0.5)  # halfway between cell centres
    assert maps[0, 0, 0] == 0.0
    plain = cam_module.upsample(cells, (30, 30), None)
    assert plain[0, 12, 22] < plain[0, 14, 25] == plain.max()  # usual resize: cell (1, 2) drawn at (14.5, 24.5)


def test_cells_are_placed_the_same_inside_inference_mode():
    # Callers such as prediction code may run under torch.inference_mode(); the probe needs autograd.
    model = _transfer_model("resnet18")
    image = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    cam_module._GRIDS.clear()
    with torch.inference_mode(), ClassActivationMap(model, method="gradcam") as cam:
        inside = cam(image, class_index=1)
    assert cam.grid is not None and cam.grid.stride == 32
    with ClassActivationMap(model, method="gradcam") as cam:
        outside = cam(image, class_index=1)
    assert torch.allclose(inside.maps, outside.maps, atol=1e-5)


def test_occlusion_needs_no_layer_and_leaves_the_model_as_it_was():
    model = _transfer_model("resnet18")
    modes = {n: m.training for n, m in model.named_modules()}
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with ClassActivationMap(model, method="occlusion") as cam:
        result = cam(image, class_index=1)
        assert _hooks_left(model) == []
    assert cam.target_layer == LAYER_FREE and result.target_layer == LAYER_FREE
    with pytest.raises(ConfigError, match="--target-layer 'layer4': --method occlusion reads no layer"):
        ClassActivationMap(model, method="occlusion", target_layer="layer4")
    assert result.map_cells == (15, 15)  # 8 px patches every 4 px over 64 px
    assert result.maps.shape == (1, 64, 64) and 0 <= result.maps.min() <= result.maps.max() == 1
    assert {n: m.training for n, m in model.named_modules()} == modes
    model.eval()  # the maps explain the model in eval mode, as prediction uses it
    with torch.no_grad():
        expected = model(image)
    for name, module in model.named_modules():
        module.training = modes[name]
    torch.testing.assert_close(result.logits, expected)


def test_occlusion_map_is_the_mean_drop_of_the_patches_covering_each_pixel():
    # MeanOfFeature's class-1 logit is the image mean; a 64 px image with one bright pixel:
    # occluding it lowers the logit only for patches that cover that pixel.
    image = torch.zeros(1, 1, 64, 64)
    image[0, 0, 30, 41] = 64.0 * 64.0 / 16  # the logit drops by 1/16 of this when covered
    with ClassActivationMap(MeanOfFeature(), method="occlusion") as cam:
        result = cam(image, class_index=1)
    heat = result.maps[0]
    assert heat[30, 41] == 1.0
    assert heat[:, :20].max() == 0 and heat[:18].max() == 0  # no patch over those pixels covers the bright one
