"""validate_config: each choice refused by the module that owns it; settings the chosen path ignores refused."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
import torch

from medtransfer.config import TrainConfig
from medtransfer.data.discover import discover
from medtransfer.errors import ConfigError, DataError, MedtransferError, WeightsError
from medtransfer.evaluation.thresholds import parse_threshold_policy
from medtransfer.models.backbones import get_backbone, load_weights_file
from medtransfer.models.strategies import Strategy
from medtransfer.runtime import resolve_precision
from medtransfer.train import validate
from medtransfer.config.rules import CONDITIONS
from medtransfer.train.validate import ignored_settings, uses_feature_probe, validate_config, validate_splits


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
        ({"tta": "rotate"}, ConfigError, ["--tta: got 'rotate'", "none, crops, flip"]),
        ({"cam_method": "lime"}, ConfigError, ["--cam-method: got 'lime'", "cam, gradcam, gradcam++, layercam"]),
        ({"cam_method": "occlusion"}, ConfigError, ["--cam-method: got 'occlusion'", "layercam", "medtransfer explain --method occlusion"]),
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
        ({"augment": False, "crop_scale": (0.8, 1.0)}, "--crop-scale", "(0.8, 1.0)", "augment is none"),
        ({"augment": False, "rotation_degrees": 0.0}, "--rotation-degrees", "0.0", "augment is none"),
        ({"augment": False, "brightness": 0.1}, "--brightness", "0.1", "augment is none"),
        ({"augment": False, "contrast": 0.0}, "--contrast", "0.0", "augment is none"),
        ({"augment": False, "horizontal_flip": True}, "--horizontal-flip", "True", "augment is none"),
        ({"strategy": "finetune", "freeze_children": 2}, "--freeze-children", "2", "only --strategy freeze"),
        ({"strategy": "linear-probe", "freeze_children": 5}, "--freeze-children", "5", "only --strategy freeze"),
        ({"focal_gamma": 1.0}, "--focal-gamma", "1.0", "only --loss focal"),
        ({**PROBE, "num_nodes": 2}, "--num-nodes", "2", "one device"),
        ({**PROBE, "mixup": 0.2}, "--mixup", "0.2", "linear probe on cached features"),
        ({**PROBE, "cutmix": 1.0}, "--cutmix", "1.0", "linear probe on cached features"),
        ({"augment": "none", "augment_on": "workers"}, "--augment-on", "'workers'", "augment is none"),
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


def test_every_read_when_names_a_condition_and_every_condition_is_used():
    used = {key for meta in TrainConfig.settings().values() for key in meta.read_when}
    assert used == set(CONDITIONS)


def test_feature_probe_path():
    assert uses_feature_probe(TrainConfig(**PROBE))
    assert not uses_feature_probe(TrainConfig(strategy="linear-probe"))
    assert not uses_feature_probe(TrainConfig(strategy="freeze", augment=False))


def test_all_ignored_settings_are_listed():
    messages = ignored_settings(TrainConfig(**PROBE, label_smoothing=0.1, sampler="balanced", brightness=0.0))
    # by condition (the probe's, then augmentation's), each in the settings' order
    assert [m.split(":")[0] for m in messages] == ["--sampler", "--label-smoothing", "--brightness"]


def test_docstring_example():
    failed, tried = doctest.testmod(validate, optionflags=doctest.ELLIPSIS)
    assert (failed, tried) == (0, 2)


# ------------------------------------------------------------ splits, before the first epoch


CLASSES = ["NORMAL", "PNEUMONIA"]


@pytest.mark.parametrize(
    ("labels", "threshold", "message"),
    [
        ({"train": ["NORMAL", "PNEUMONIA"], "val": ["NORMAL", "NORMAL"]}, "sensitivity:0.95",
         r"the val split holds only NORMAL \(2 image\(s\)\), but --threshold sensitivity:0.95 chooses the threshold on it "
         r"and needs the positive class PNEUMONIA and another class; raise --val-fraction"),
        ({"train": ["NORMAL", "PNEUMONIA"], "val": CLASSES, "test": ["PNEUMONIA"]}, "youden",
         r"the test split holds only PNEUMONIA .*AUC and the other scores are computed on it"),
        ({"train": ["NORMAL", "NORMAL"], "val": CLASSES, "test": CLASSES}, "youden",
         r"class\(es\) PNEUMONIA appear in val/test but not in the train split"),
        ({"train": ["NORMAL"], "val": CLASSES}, "youden", r"the train split has 1 image\(s\); training needs at least 2"),
    ],
)
def test_splits_that_would_fail_after_training_are_refused_before_it(labels, threshold, message):
    with pytest.raises(DataError, match=r"^--data /d: " + message):
        validate_splits(labels, CLASSES, TrainConfig(data="/d", threshold=threshold), "PNEUMONIA")


def test_usable_splits_pass():
    validate_splits({"train": CLASSES, "val": CLASSES, "test": CLASSES}, CLASSES, TrainConfig(data="/d"), "PNEUMONIA")


# --------------------------------------------------------------------------- transfer strategies


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"head": "conv"}, "--head: got 'conv'; choose one of linear, mlp, dwconv"),
        ({"strategy": "linear-probe", "wise_ft": True}, "--wise-ft: got true, but a linear probe's start has a random head"),
        ({"strategy": "linear-probe", "augment": False, "head": "dwconv"}, "--head: got 'dwconv', but the linear probe on cached features"),
        ({"strategy": "gradual", "weight_averaging": "swa"}, "--weight-averaging: got 'swa', but --strategy gradual keeps frozen"),
        ({"lp_epochs": 3}, "--lp_epochs: got 3, but only --strategy lp-ft has a linear-probe phase"),
        ({"strategy": "finetune", "unfreeze_every": 2}, "--unfreeze_every: got 2, but only --strategy gradual"),
        ({"strategy": "linear-probe", "lr_decay": 0.7}, "--lr_decay: got 0.7, but"),
        ({"ema_decay": 0.99}, "--ema_decay: got 0.99, but only --weight-averaging ema uses it"),
        ({"lr_decay": 1.5}, "--lr-decay: got 1.5; expected a number in (0, 1]"),
        ({"weight_averaging": "polyak"}, "--weight-averaging: got 'polyak'; expected none, ema or swa"),
    ],
)
def test_transfer_choices_that_cannot_work_are_refused_before_the_run(values, message):
    assert refusal(lambda: validate_config(TrainConfig(**values))).startswith(message.replace("_", "-"))


@pytest.mark.parametrize(
    "values",
    [
        {"strategy": "lp-ft", "lp_epochs": 3, "lp_lr": 1e-2, "wise_ft": True, "weight_averaging": "swa", "head": "dwconv"},
        {"strategy": "gradual", "unfreeze_every": 2, "lr_decay": 0.7, "weight_averaging": "ema", "ema_decay": 0.99},
        {"strategy": "freeze", "lr_decay": 0.7, "head": "mlp", "wise_ft": True},
        {"strategy": "linear-probe", "augment": False, "head": "mlp"},
    ],
)
def test_transfer_combinations_that_work_are_accepted(values):
    validate_config(TrainConfig(**values))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"augment": "flips"}, "--augment: got 'flips'; choose one of none, light, radiograph, trivial"),
        ({"augment_on": "gpu"}, "--augment-on: got 'gpu'; choose one of auto, workers, device"),
        ({"augment_on": "device", "accelerator": "cpu"}, "--augment-on: got 'device', but training runs on the CPU"),
        ({"mixup": 0.2, "batch_size": 1}, "--mixup: got 0.2, but a batch of 1 has no second image"),
    ],
)
def test_augmentation_choices_are_refused_in_one_line(values, message):
    refused = refusal(lambda: validate_config(TrainConfig(**values)))
    assert refused.startswith(message) and "\n" not in refused


@pytest.mark.parametrize("policy", ["light", "radiograph", "trivial"])
def test_mixing_composes_with_label_smoothing_class_weights_and_focal_loss(policy):
    validate_config(TrainConfig(augment=policy, mixup=0.2, cutmix=1.0, label_smoothing=0.1, class_weights="balanced",
                                loss="focal", focal_gamma=1.0))


def test_a_missing_split_file_is_refused_with_how_to_write_one(tmp_path):
    missing = tmp_path / "split.csv"
    with pytest.raises(ConfigError, match=rf"^--split-file {missing}: no such file; write one with `medtransfer split"):
        validate_config(TrainConfig(split_file=str(missing)))


def test_split_drawing_settings_are_refused_next_to_a_split_file(tmp_path):
    split = tmp_path / "split.csv"
    split.write_text("path,label,patient_id,split\n")
    validate_config(TrainConfig(split_file=str(split)))
    with pytest.raises(ConfigError, match=r"^--val-fraction: got 0.3, but --split-file gives the split as is"):
        validate_config(TrainConfig(split_file=str(split), val_fraction=0.3))
