"""Backbone registry: parameter counts, weight sources and their errors."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medtransfer.errors import ConfigError, WeightsError
from medtransfer.models.backbones import IMAGENET, Normalization, create_backbone, get_backbone, list_backbones
from medtransfer.models.strategies import Strategy, backbone_children, build_transfer_model


@pytest.mark.parametrize(
    "strategy, expected_trainable",
    [
        (Strategy("finetune"), 11_177_538),
        (Strategy("freeze", 4), 11_168_002),  # conv1, bn1, relu, maxpool frozen: 9,536 parameters
        (Strategy("linear-probe"), 1_026),
    ],
)
def test_resnet18_parameter_counts_match_the_published_figures(strategy, expected_trainable):
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = build_transfer_model(net, spec, strategy)
    assert model.parameter_counts() == {"total": 11_177_538, "trainable": expected_trainable, "head": 1_026}


@pytest.mark.parametrize("name", list_backbones())
def test_every_registered_backbone_gets_a_head_of_its_real_feature_width(name):
    net, spec = create_backbone(name, num_classes=3, weights="none")
    head = net.get_submodule(spec.head)
    assert head.out_features == 3
    net.eval()
    with torch.no_grad():
        logits = net(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 3)
    assert spec.cam_layer in dict(net.named_modules())


def test_any_timm_name_works_and_unknown_names_suggest_close_ones():
    net, spec = create_backbone("mobilenetv3_small_050", num_classes=2, weights="none")
    assert spec.source == "timm" and net.get_submodule(spec.head).out_features == 2
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet19'.*Did you mean.*resnet18"):
        get_backbone("resnet19")


def test_frozen_batchnorm_stays_in_eval_mode_and_frozen_prefix_gets_no_gradients():
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = build_transfer_model(net, spec, Strategy("freeze", 5))  # conv1, bn1, relu, maxpool, layer1
    model.train()
    assert not model.net.bn1.training and not model.net.layer1[0].bn1.training
    assert model.net.layer2[0].bn1.training
    running_mean = model.net.bn1.running_mean.clone()
    model(torch.rand(4, 3, 64, 64)).sum().backward()
    assert torch.equal(model.net.bn1.running_mean, running_mean)
    assert model.net.conv1.weight.grad is None and model.net.layer2[0].conv1.weight.grad is not None


def test_freeze_children_out_of_range_lists_the_children():
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    with pytest.raises(ConfigError, match=r"--freeze-children: got 12; resnet18 has 9 children.*conv1, bn1"):
        build_transfer_model(net, spec, Strategy("freeze", 12))
    assert backbone_children(net, spec)[:4] == ["conv1", "bn1", "relu", "maxpool"]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_round_trip_loads_every_backbone_tensor(tmp_path: Path, suffix):
    source, _ = create_backbone("resnet18", num_classes=1000, weights="none")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    net, _ = create_backbone("resnet18", num_classes=2, weights=str(path))
    assert torch.equal(net.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    assert net.fc.out_features == 2  # the 1000-class head is not loaded


def test_weights_file_with_wrong_shapes_lists_them(tmp_path: Path):
    other, _ = create_backbone("resnet50", num_classes=2, weights="none")
    path = tmp_path / "resnet50.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(WeightsError, match=r"does not fit backbone resnet18: \d+ wrong shapes \(e\.g\. .*\).*unexpected keys"):
        create_backbone("resnet18", num_classes=2, weights=str(path))


def test_weights_file_errors_name_the_file(tmp_path: Path):
    with pytest.raises(WeightsError, match="no such file"):
        create_backbone("resnet18", num_classes=2, weights=str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=f"--weights {garbage}: cannot read weights"):
        create_backbone("resnet18", num_classes=2, weights=str(garbage))


def test_imagenet_download_failure_says_what_to_do(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache: forces a download attempt

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("torch.hub.load_state_dict_from_url", offline)
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline, raising=False)
    with pytest.raises(WeightsError, match=r"could not download ImageNet weights for resnet18.*--weights none"):
        create_backbone("resnet18", num_classes=2, weights="imagenet")


def test_packaged_efficientnet_lite0_imagenet_weights_recognise_a_photo():
    """The offline ImageNet weights are real: a photo of a temple lands in a building class."""
    from sklearn.datasets import load_sample_image
    from torchvision.models import ResNet18_Weights

    net, spec = create_backbone("efficientnet_lite0", num_classes=2, weights="imagenet")
    reference, _ = create_backbone("efficientnet_lite0", num_classes=2, weights="none")
    assert not torch.equal(net.conv_stem.weight, reference.conv_stem.weight)

    import timm

    classifier = timm.create_model("efficientnet_lite0", pretrained=False)
    classifier.load_state_dict(spec.imagenet_state_dict())
    classifier.eval()
    photo = torch.tensor(load_sample_image("china.jpg")).permute(2, 0, 1).float()[None] / 255
    photo = torch.nn.functional.interpolate(photo, size=(224, 224), mode="bilinear", antialias=True)
    mean = torch.tensor(spec.normalization.mean)[:, None, None]
    std = torch.tensor(spec.normalization.std)[:, None, None]
    with torch.no_grad():
        top5 = classifier((photo - mean) / std)[0].topk(5).indices.tolist()
    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    buildings = {"palace", "bell cote", "church", "monastery", "stupa", "pagoda", "boathouse", "dome", "castle"}
    assert buildings & {categories[i] for i in top5}, [categories[i] for i in top5]


@pytest.mark.parametrize("name", list_backbones())
def test_single_channel_input_gives_the_same_logits_as_repeated_grayscale(name):
    torch.manual_seed(0)
    rgb, spec = create_backbone(name, num_classes=2, weights="none")
    gray, _ = create_backbone(name, num_classes=2, weights="none", in_channels=1)
    state = rgb.state_dict()
    first = spec.first_conv + ".weight"
    gray.load_state_dict({**state, first: state[first].sum(dim=1, keepdim=True)})
    assert gray.get_submodule(spec.first_conv).in_channels == 1
    image = torch.rand(2, 1, 64, 64)
    rgb.eval(), gray.eval()
    with torch.no_grad():
        assert torch.allclose(gray(image), rgb(image.expand(-1, 3, -1, -1)), atol=1e-4)


def test_single_channel_conversion_keeps_loaded_weights(tmp_path):
    source, spec = create_backbone("resnet18", num_classes=1000, weights="none")
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    gray, _ = create_backbone("resnet18", num_classes=2, weights=str(path), in_channels=1)
    assert torch.allclose(gray.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    with pytest.raises(ConfigError, match="--in-channels: got 2"):
        create_backbone("resnet18", num_classes=2, weights="none", in_channels=2)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50"])
def test_output_stride_16_keeps_the_weights_and_doubles_the_cam_grid(name):
    coarse, spec = create_backbone(name, num_classes=2, weights="none")
    fine, _ = create_backbone(name, num_classes=2, weights="none", output_stride=16)
    assert {k: v.shape for k, v in coarse.state_dict().items()} == {k: v.shape for k, v in fine.state_dict().items()}
    fine.load_state_dict(coarse.state_dict())  # ImageNet or trained weights carry over unchanged
    sizes = {}
    for label, net in (("coarse", coarse), ("fine", fine)):
        hook = net.get_submodule(spec.cam_layer).register_forward_hook(lambda m, a, o, k=label: sizes.__setitem__(k, o.shape[-1]))
        with torch.no_grad():
            net.eval()(torch.rand(1, 3, 128, 128))
        hook.remove()
    assert sizes == {"coarse": 4, "fine": 8}


def test_output_stride_errors_name_the_backbone_and_the_way_out():
    with pytest.raises(ConfigError, match=r"resnet18 only has output stride 32.*resnet50"):
        create_backbone("resnet18", num_classes=2, weights="none", output_stride=16)
    with pytest.raises(ConfigError, match=r"output_stride: got 12; choose one of 32, 16, 8"):
        create_backbone("resnet50", num_classes=2, weights="none", output_stride=12)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "densenet121"])
def test_torchvision_backbones_carry_the_normalisation_of_their_weights(name):
    import torchvision

    spec = get_backbone(name)
    preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    assert spec.normalization.mean == pytest.approx(tuple(preset.mean))
    assert spec.normalization.std == pytest.approx(tuple(preset.std))


def test_timm_backbones_take_the_normalisation_from_their_pretrained_config():
    import timm

    spec = get_backbone("efficientnet_lite0")
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("efficientnet_lite0", pretrained=False))
    assert spec.normalization.mean == pytest.approx(cfg["mean"]) and spec.normalization.std == pytest.approx(cfg["std"])
    other = get_backbone("tf_efficientnet_lite0")  # a timm model with non-ImageNet statistics
    assert other.normalization == Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert other.normalization != IMAGENET


def test_models_do_not_import_the_data_package():
    """Normalisation lives with the backbone spec; data/transforms.py takes it as plain values."""
    import subprocess
    import sys

    code = "import sys, medtransfer.models.backbones; print(any(m.startswith('medtransfer.data') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
