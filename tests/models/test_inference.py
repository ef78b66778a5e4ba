"""models/inference: TTA views and the averaged network (members x views, mean of logits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medtransfer.errors import ConfigError
from medtransfer.models.backbones import create_backbone
from medtransfer.models.inference import AveragedNetwork, inference_network, tta_views
from medtransfer.models.strategies import TransferModel


def tiny_model(seed: int) -> TransferModel:
    torch.manual_seed(seed)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    return TransferModel(net, spec).eval()


@pytest.mark.parametrize("mode,count", [("none", 1), ("flip", 2), ("crops", 5)])
def test_views_start_with_the_evaluation_crop_and_keep_the_shape(mode, count):
    images = torch.randn(2, 3, 40, 40)
    views = tta_views(images, mode)
    assert len(views) == count
    assert torch.equal(views[0], images)
    assert all(v.shape == images.shape for v in views)


def test_flip_mirrors_left_and_right_and_crops_are_corner_crops_resized():
    images = torch.arange(2 * 3 * 20 * 20, dtype=torch.float32).reshape(2, 3, 20, 20)
    assert torch.equal(tta_views(images, "flip")[1][..., 0], images[..., -1])
    top_left = F.interpolate(images[:, :, :18, :18], size=(20, 20), mode="bilinear", align_corners=False)
    assert torch.equal(tta_views(images, "crops")[1], top_left)


def test_unknown_tta_names_the_option_and_the_choices():
    with pytest.raises(ConfigError, match=r"--tta: got 'rotate'; choose one of none, crops, flip"):
        tta_views(torch.zeros(1, 3, 8, 8), "rotate")


def test_averaged_network_is_the_mean_of_member_logits_over_views():
    members = [tiny_model(1), tiny_model(2)]
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = torch.stack([m(v) for m in members for v in tta_views(images, "flip")]).mean(0)
        got = AveragedNetwork(members, "flip")(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_one_model_without_tta_runs_unwrapped():
    model = tiny_model(0)
    assert inference_network([model], "none") is model
    assert isinstance(inference_network([model], "crops"), AveragedNetwork)


def test_head_hook_sees_the_first_member_on_the_evaluation_crop_first():
    members = [tiny_model(1), tiny_model(2)]
    network = AveragedNetwork(members, "crops")
    captured: list[torch.Tensor] = []
    handle = network.head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    images = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        network(images)
        features = nn.Sequential(*list(members[0].net.children())[:-1])(images).flatten(1)
    handle.remove()
    torch.testing.assert_close(captured[0], features)
