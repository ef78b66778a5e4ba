"""AdaBN and TENT: what they change (BatchNorm statistics, BN affine for TENT) and what they refuse."""

from __future__ import annotations

import pytest
import torch

from medtransfer.adapt.batchnorm import (
    MIN_IMAGES, batchnorm_layers, changed_tensors, input_moments, reestimate_batchnorm, tent,
)
from medtransfer.errors import DataError
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import Strategy, build_transfer_model


def model():
    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    return build_transfer_model(net, spec, Strategy("finetune", 0)).eval()


def batches(n: int, shift: float = 0.5):
    images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 1.5 + shift
    return lambda: iter(images.split(16))


def test_reestimation_changes_only_the_batchnorm_running_statistics():
    original = model()
    kept = {k: v.clone() for k, v in original.state_dict().items()}
    adapted = reestimate_batchnorm(original, batches(80), images=80)
    changed = changed_tensors(original, adapted)
    assert changed and all(name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
                           for name in changed)
    assert {name.rsplit(".", 1)[0] for name in changed if name.endswith("running_mean")} == set(batchnorm_layers(adapted))
    assert all(torch.equal(kept[k], v) for k, v in original.state_dict().items())  # the input model is untouched
    assert not adapted.training and all(not m.training for m in adapted.modules())


def test_the_statistics_are_those_of_the_new_images():
    adapted = reestimate_batchnorm(model(), batches(96, shift=3.0), images=96)
    first = adapted.net.bn1
    conv = adapted.net.conv1
    with torch.no_grad():
        out = conv(torch.cat(list(batches(96, shift=3.0)())))
    torch.testing.assert_close(first.running_mean, out.mean(dim=(0, 2, 3)), rtol=1e-3, atol=1e-3)


def test_source_relative_statistics_undo_a_change_of_grey_levels_that_plain_adabn_does_not():
    """Random init keeps BatchNorm statistics (0, 1) that are not the source images' - like the ImageNet statistics of
    a frozen layer. New images = source images at another contrast and brightness. Matching moments relative to the
    source's gives the source outputs back; plain AdaBN standardises instead and lands elsewhere."""
    torch.manual_seed(0)
    original = model()
    source = torch.rand(96, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 + 1
    new = source * 0.5 - 0.7
    with torch.no_grad():
        wanted, unadapted = original(source), original(new)
    moments = input_moments(original, source.split(32))
    relative = reestimate_batchnorm(original, lambda: iter(new.split(32)), images=96, source=moments)
    plain = reestimate_batchnorm(original, lambda: iter(new.split(32)), images=96)
    with torch.no_grad():
        error = {name: float((m(new) - wanted).abs().mean()) for name, m in (("relative", relative), ("plain", plain))}
    baseline = float((unadapted - wanted).abs().mean())
    assert error["relative"] < 0.2 * baseline and error["relative"] < 0.1 * error["plain"]  # (zero padding: not exact)
    itself = reestimate_batchnorm(original, lambda: iter(source.split(32)), images=96, source=moments)
    with torch.no_grad():
        assert float((itself(source) - wanted).abs().mean()) < 0.01  # adapting to the source images changes nothing


def test_with_source_moments_equal_to_the_saved_statistics_it_is_plain_adabn():
    original = model()
    saved = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in batchnorm_layers(original).items()}
    a = reestimate_batchnorm(original, batches(80), images=80, source=saved)
    b = reestimate_batchnorm(original, batches(80), images=80)
    for name in saved:
        torch.testing.assert_close(a.state_dict()[f"{name}.running_var"], b.state_dict()[f"{name}.running_var"])


@pytest.mark.parametrize("count", [0, 10, MIN_IMAGES - 1])
def test_too_few_images_are_refused_with_the_reason(count):
    with pytest.raises(DataError, match=f"{count} images; re-estimating BatchNorm statistics needs at least {MIN_IMAGES}"):
        reestimate_batchnorm(model(), batches(max(count, 2)), images=count)


def test_tent_moves_only_batchnorm_affine_parameters_and_statistics():
    original = model()
    adapted, entropy = tent(original, batches(64), images=64, epochs=2, lr=1e-2)
    kinds = {name.rsplit(".", 1)[-1] for name in changed_tensors(original, adapted)}
    assert kinds <= {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"} and "weight" in kinds
    bn_params = {f"{name}.{p}" for name in batchnorm_layers(adapted) for p in ("weight", "bias")}
    assert {n for n in changed_tensors(original, adapted) if n.endswith(("weight", "bias"))} <= bn_params
    assert len(entropy) == 2 and not any(p.requires_grad for p in adapted.parameters())
