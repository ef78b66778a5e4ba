"""validate_config: each choice refused by the module that owns it; settings the chosen path ignores refused."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
import torch

from medtransfer.config import TrainConfig
from medtransfer.data.discover import discover
from medtransfer.errors import ConfigError, MedtransferError, WeightsError
from medtransfer.evaluation.thresholds import parse_threshold_policy
from medtransfer.models.backbones import get_backbone, load_weights_file
from medtransfer.models.strategies import Strategy
from medtransfer.runtime import resolve_precision
from medtransfer.train import validate
from medtransfer.train.validate import IGNORED_SETTINGS, ignored_settings, uses_feature_probe, validate_config


def refusal(call) -> str:
    with pytest.raises(MedtransferError) as info:
        call()
    return str(info.value)


def test_the_default_configuration_is_valid():
    validate_config(TrainConfig())


# --------------------------------------------------------------------------- choices, checked by their owners


@pytest.mark.parametrize(
    ("values", "owner"),
    [
        ({"threshold": "median"}, lambda: parse_threshold_policy("median")),
        ({"threshold": "sensitivity:1.7"}, lambda: parse_threshold_policy("sensitivity:1.7")),
        ({"precision": "fp8"}, lambda: resolve_precision("fp8", "cpu")),
        ({"strategy": "thaw"}, lambda: Strategy("thaw")),
        ({"backbone": "resnet-18"}, lambda: get_backbone("resnet-18")),
        ({"backbone": "resnet18", "output_stride": 16}, lambda: get_backbone("resnet18").build(output_stride=16)),
        ({"labels": "3class"}, lambda: discover("/nowhere", labels="3class")),
        ({"weights": "/nowhere/w.pth"}, lambda: load_weights_file(Path("/nowhere/w.pth"))),
    ],
)
def test_a_refused_choice_gets_its_owners_message(values, owner):
    assert refusal(lambda: validate_config(TrainConfig(**values))) == refusal(owner)


@pytest.mark.parametrize(
    ("values", "error", "fragments"),
    [
        ({"accelerator": "tpu"}, ConfigError, ["--accelerator: got 'tpu'", "cpu", "gpu"]),
        ({"loss": "bce"}, ConfigError, ["--loss: got 'bce'", "cross-entropy, focal"]),
        ({"precision": "fp8"}, ConfigError, ["--precision: got 'fp8'", "bf16-mixed"]),
        ({"threshold": "median"}, ConfigError, ["--threshold: got 'median'", "youden"]),
        ({"labels": "3class"}, ConfigError, ["--labels: got '3class'", "folder, kermany-3class"]),
        ({"strategy": "thaw"}, ConfigError, ["--strategy: got 'thaw'", "linear-probe"]),
        ({"backbone": "resnet-18"}, ConfigError, ["--backbone", "'resnet-18'", "Did you mean", "resnet18"]),
        ({"output_stride": 16}, ConfigError, ["output_stride", "16", "resnet18", "resnet50"]),
        ({"epochs": 0}, ConfigError, ["--epochs: got 0"]),  # the config's own checks run as well
    ],
)
def test_refusals_name_the_option_the_value_and_the_choices(values, error, fragments):
    with pytest.raises(error) as info:
        validate_config(TrainConfig(**values))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_weights_file_is_checked_before_anything_else_reads_it(tmp_path):
    not_weights = tmp_path / "notes.pth"
    torch.save({"lr": 0.1}, not_weights)
    with pytest.raises(WeightsError, match=rf"--weights {not_weights}: expected a state dict of tensors"):
        validate_config(TrainConfig(weights=str(not_weights)))
    weights = tmp_path / "w.pth"
    torch.save({"conv.weight": torch.zeros(1)}, weights)
    validate_config(TrainConfig(weights=str(weights)))  # whether it fits is checked when the model is built


# --------------------------------------------------------------------------- settings the chosen path ignores

PROBE = {"strategy": "linear-probe", "augment": False}


@pytest.mark.parametrize(
    ("values", "setting", "shown", "why"),
    [
        ({**PROBE, "loss": "focal"}, "--loss", "'focal'", "linear probe on cached features"),
        ({**PROBE, "label_smoothing": 0.1}, "--label-smoothing", "0.1", "plain cross-entropy"),
        ({**PROBE, "sampler": "balanced"}, "--sampler", "'balanced'", "shuffled batches"),
        ({**PROBE, "warmup_epochs": 0}, "--warmup-epochs", "0", "constant learning rate"),
        ({**PROBE, "channels_last": False}, "--channels-last", "False", "linear probe on cached features"),
        ({**PROBE, "devices": "2"}, "--devices", "'2'", "one device"),
        ({"augment": False, "crop_scale": (0.8, 1.0)}, "--crop-scale", "(0.8, 1.0)", "augment is false"),
        ({"augment": False, "rotation_degrees": 0.0}, "--rotation-degrees", "0.0", "augment is false"),
        ({"augment": False, "brightness": 0.1}, "--brightness", "0.1", "augment is false"),
        ({"augment": False, "contrast": 0.0}, "--contrast", "0.0", "augment is false"),
        ({"augment": False, "horizontal_flip": True}, "--horizontal-flip", "True", "augment is false"),
        ({"strategy": "finetune", "freeze_children": 2}, "--freeze-children", "2", "only --strategy freeze"),
        ({"strategy": "linear-probe", "freeze_children": 5}, "--freeze-children", "5", "only --strategy freeze"),
        ({"focal_gamma": 1.0}, "--focal-gamma", "1.0", "only --loss focal"),
        ({**PROBE, "num_nodes": 2}, "--num-nodes", "2", "one device"),
    ],
)
def test_a_setting_the_chosen_path_ignores_is_refused_in_one_line(values, setting, shown, why):
    message = refusal(lambda: validate_config(TrainConfig(**values)))
    assert message.startswith(f"{setting}: got {shown}, but ") and why in message
    assert "remove the setting" in message and "\n" not in message


@pytest.mark.parametrize(
    "values",
    [
        {"strategy": "finetune", "label_smoothing": 0.1, "sampler": "balanced", "warmup_epochs": 0, "loss": "focal",
         "focal_gamma": 1.0},
        {"strategy": "linear-probe", "augment": True, "label_smoothing": 0.1, "sampler": "balanced"},
        {"strategy": "freeze", "freeze_children": 2, "augment": False, "label_smoothing": 0.1},
        {"accelerator": "auto", "devices": "2"},
        {"accelerator": "cpu", "devices": "2", "distributed": "ddp_spawn"},  # one process per CPU device (gloo)
    ],
)
def test_the_same_settings_are_accepted_where_the_path_uses_them(values):
    assert ignored_settings(TrainConfig(**values)) == []
    validate_config(TrainConfig(**values))


@pytest.mark.parametrize("strategy", ["finetune", "freeze", "linear-probe"])
@pytest.mark.parametrize("augment", [True, False])
@pytest.mark.parametrize("accelerator", ["auto", "cpu"])
def test_defaults_never_count_as_set(tmp_path, strategy, augment, accelerator):
    config = TrainConfig(strategy=strategy, augment=augment, accelerator=accelerator)
    assert ignored_settings(config) == []
    config.write_yaml(tmp_path / "config.yaml")  # every setting written out, as a resumed run reads it
    assert ignored_settings(TrainConfig.from_sources(tmp_path / "config.yaml")) == []


def test_every_listed_setting_exists():
    names = set(TrainConfig.field_names())
    assert {s for rule in IGNORED_SETTINGS for s in rule.settings} <= names


def test_feature_probe_path():
    assert uses_feature_probe(TrainConfig(**PROBE))
    assert not uses_feature_probe(TrainConfig(strategy="linear-probe"))
    assert not uses_feature_probe(TrainConfig(strategy="freeze", augment=False))


def test_all_ignored_settings_are_listed():
    messages = ignored_settings(TrainConfig(**PROBE, label_smoothing=0.1, sampler="balanced", brightness=0.0))
    assert [m.split(":")[0] for m in messages] == ["--label-smoothing", "--sampler", "--brightness"]


def test_docstring_example():
    failed, tried = doctest.testmod(validate, optionflags=doctest.ELLIPSIS)
    assert (failed, tried) == (0, 2)
