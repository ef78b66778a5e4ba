"""Tests for medtransfer.config: precedence, YAML in/out, type coercion, validation messages,
and the resolution of `medtransfer train`'s sources (new run, resumed run, --set, cache folder)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medtransfer.config import TrainConfig, default_cache_dir, parse_class_map, parse_set_values, read_yaml, resolve_train_config
from medtransfer.errors import ConfigError
from medtransfer.rundir import CONFIG_FILE


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- precedence


def test_defaults_without_sources():
    assert TrainConfig.from_sources() == TrainConfig()


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    config_file = write(tmp_path / "c.yaml", "epochs: 5\nlr: 0.01\nbackbone: resnet50\n")
    config = TrainConfig.from_sources(config_file, {"epochs": 7, "batch_size": 8})
    assert config.epochs == 7  # YAML and override: the override wins
    assert config.lr == 0.01  # YAML only
    assert config.backbone == "resnet50"
    assert config.batch_size == 8  # override only
    assert config.patience == TrainConfig().patience  # neither: the default


def test_override_none_means_not_given(tmp_path):
    config_file = write(tmp_path / "c.yaml", "epochs: 5\nstrict: true\n")
    config = TrainConfig.from_sources(config_file, {"epochs": None, "strict": None, "seed": 3})
    assert (config.epochs, config.strict, config.seed) == (5, True, 3)


def test_override_false_is_kept(tmp_path):
    config_file = write(tmp_path / "c.yaml", "progress: true\n")
    assert TrainConfig.from_sources(config_file, {"progress": False}).progress is False


def test_empty_yaml_gives_defaults(tmp_path):
    assert TrainConfig.from_sources(write(tmp_path / "c.yaml", "# nothing\n")) == TrainConfig()


# --------------------------------------------------------------------------- unknown keys and types


@pytest.mark.parametrize(
    ("key", "suggestion"), [("epoch", "epochs"), ("val-fraction", "val_fraction"), ("learning_rat", None)]
)
def test_unknown_yaml_key(tmp_path, key, suggestion):
    config_file = write(tmp_path / "c.yaml", f"{key}: 3\n")
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_sources(config_file)
    message = str(info.value)
    assert str(config_file) in message and f"unknown setting {key!r}" in message
    if suggestion:
        assert f"did you mean {suggestion!r}?" in message
    else:
        assert "known settings:" in message and "val_fraction" in message


def test_unknown_override_key_names_options_not_the_file(tmp_path):
    config_file = write(tmp_path / "c.yaml", "epochs: 3\n")
    with pytest.raises(ConfigError, match=r"^options: unknown setting 'bach_size'; did you mean 'batch_size'\?"):
        TrainConfig.from_sources(config_file, {"bach_size": 4})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("epochs", "abc", "a whole number"),
        ("epochs", 2.5, "a whole number"),
        ("epochs", True, "a whole number"),  # YAML `epochs: yes`
        ("epochs", None, "a whole number"),
        ("lr", "fast", "a number"),
        ("lr", [0.1], "a number"),
        ("strict", "maybe", "true or false"),
        ("strict", 2, "true or false"),
        ("crop_scale", "0.5", "a list of 2 numbers, e.g. 0.6,1.0"),
        ("crop_scale", [0.2, 0.5, 1.0], "a list of 2 numbers"),
        ("crop_scale", ["a", "b"], "a list of 2 numbers"),
        ("backbone", ["resnet18", "resnet50"], "a text value"),
        ("backbone", None, "a text value"),
    ],
)
def test_wrong_type_names_setting_and_value(key, value, expected):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({key: value}, source="options")
    message = str(info.value)
    assert message.startswith(f"options: setting {key!r} got {value!r}; expected {expected}")


def test_wrong_type_in_yaml_names_the_file(tmp_path):
    config_file = write(tmp_path / "c.yaml", "epochs: abc\n")
    with pytest.raises(ConfigError, match=rf"--config {tmp_path}.*setting 'epochs' got 'abc'"):
        TrainConfig.from_sources(config_file)


def test_wrong_type_in_override_names_options(tmp_path):
    config_file = write(tmp_path / "c.yaml", "epochs: 3\n")
    with pytest.raises(ConfigError, match=r"^options: setting 'epochs' got 'abc'"):
        TrainConfig.from_sources(config_file, {"epochs": "abc"})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("epochs", "12", 12),
        ("epochs", 12.0, 12),
        ("lr", "1e-3", 1e-3),  # --set lr=1e-3 and YAML 1.1's `lr: 1e-3` both arrive as text
        ("lr", 3, 3.0),
        ("strict", "yes", True),
        ("strict", "Off", False),
        ("strict", 1, True),
        ("horizontal_flip", True, True),
        ("crop_scale", "0.5,0.9", (0.5, 0.9)),
        ("crop_scale", [0.5, 1], (0.5, 1.0)),
        ("patient_regex", r"^(p\d+)_", r"^(p\d+)_"),
        ("patient_regex", None, None),
        ("positive_class", 1, "1"),
        ("devices", 2, "2"),
    ],
)
def test_values_are_coerced_to_the_setting_type(key, value, expected):
    config = TrainConfig.from_dict({key: value})
    assert getattr(config, key) == expected
    assert type(getattr(config, key)) is type(expected)


def test_tuple_setting_from_yaml_list(tmp_path):
    config = TrainConfig.from_sources(write(tmp_path / "c.yaml", "crop_scale: [0.3, 0.9]\n"))
    assert config.crop_scale == (0.3, 0.9)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("values", "flag", "shown"),
    [
        ({"val_fraction": 1.5}, "--val-fraction", "1.5"),
        ({"val_fraction": 0}, "--val-fraction", "0.0"),
        ({"test_fraction": 1.0}, "--test-fraction", "1.0"),
        ({"epochs": 0}, "--epochs", "0"),
        ({"batch_size": -4}, "--batch-size", "-4"),
        ({"lr": 0}, "--lr", "0.0"),
        ({"lr": "nan"}, "--lr", "nan"),
        ({"image_size": 8, "cache_size": 8}, "--image-size", "8"),
        ({"cache_size": 200}, "--cache-size", "200"),
        ({"cache_size": 300, "image_size": 320}, "--cache-size", "300"),
        ({"eval_crop_fraction": 1.2}, "--eval-crop-fraction", "1.2"),
        ({"crop_scale": [0.9, 0.5]}, "--crop-scale", "(0.9, 0.5)"),
        ({"crop_scale": [0.0, 1.0]}, "--crop-scale", "(0.0, 1.0)"),
        ({"crop_scale": [0.5, 1.5]}, "--crop-scale", "(0.5, 1.5)"),
        ({"label_smoothing": 1.0}, "--label-smoothing", "1.0"),
        ({"freeze_children": -1}, "--freeze-children", "-1"),
        ({"num_workers": -2}, "--num-workers", "-2"),
        ({"weight_decay": -0.1}, "--weight-decay", "-0.1"),
        ({"class_weights": "auto"}, "--class-weights", "'auto'"),
        ({"sampler": "random"}, "--sampler", "'random'"),
        ({"calibrate": "platt"}, "--calibrate", "'platt'"),
        ({"bootstrap": -1}, "--bootstrap", "-1"),
    ],
)
def test_validation_names_flag_and_value(values, flag, shown):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(values)
    message = str(info.value)
    assert message.startswith(f"{flag}: got {shown}; expected ")


def test_cache_size_message_says_what_to_do():
    with pytest.raises(ConfigError, match=r"--cache-size: got 200; expected at least image_size \(224\)"):
        TrainConfig.from_dict({"cache_size": 200})


def test_validation_applies_after_merging_sources(tmp_path):
    # The YAML alone is invalid (cache_size < image_size), the flag fixes it.
    config_file = write(tmp_path / "c.yaml", "image_size: 320\n")
    assert TrainConfig.from_sources(config_file, {"cache_size": 352}).cache_size == 352
    with pytest.raises(ConfigError, match="--cache-size"):
        TrainConfig.from_sources(config_file)


@pytest.mark.parametrize(
    "values", [{"val_fraction": 0.5, "test_fraction": 0.0}, {"image_size": 16, "cache_size": 16}, {"lr": 1e-6}]
)
def test_boundary_values_are_accepted(values):
    config = TrainConfig.from_dict(values)
    assert {k: getattr(config, k) for k in values} == values


# --------------------------------------------------------------------------- YAML in and out


def test_yaml_round_trip(tmp_path):
    config = TrainConfig.from_dict(
        {
            "data": "/data/chest_xray",
            "patient_regex": r"^(p\d+)_",
            "crop_scale": (0.5, 0.95),
            "epochs": 4,
            "lr": 3e-4,
            "strict": True,
            "positive_class": "PNEUMONIA",
            "threshold": "sensitivity:0.95",
            "devices": "1",
        }
    )
    path = tmp_path / "config.yaml"
    config.write_yaml(path)

    assert TrainConfig.from_sources(path) == config
    saved = yaml.safe_load(path.read_text())
    assert list(saved) == TrainConfig.field_names()  # every setting, in declaration order
    assert saved["crop_scale"] == [0.5, 0.95]  # plain YAML list, no Python tags


def test_default_config_round_trip(tmp_path):
    TrainConfig().write_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_sources(tmp_path / "c.yaml") == TrainConfig()


def test_to_dict_has_every_field():
    assert set(TrainConfig().to_dict()) == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("epochs: [1, 2\n", "not valid YAML"),
        ("- epochs\n- lr\n", "expected a mapping of setting: value, got list"),
    ],
)
def test_bad_yaml_file(tmp_path, text, match):
    config_file = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match=match) as info:
        read_yaml(config_file)
    assert str(config_file) in str(info.value)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match=r"--config .*missing.yaml: no such file"):
        TrainConfig.from_sources(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- layering


def test_config_imports_only_the_lowest_modules():
    # Choices owned by other modules are checked by medtransfer.train.validate, not here.
    code = "import sys, medtransfer.config; print(sorted(m for m in sys.modules if m.startswith('medtransfer.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    allowed = {"medtransfer.errors", "medtransfer.rundir", "medtransfer.safeio", "medtransfer.task"}
    assert {m for m in eval(loaded) if not m.startswith("medtransfer.config")} <= allowed


def test_config_does_not_import_torch():
    # The task kinds it validates come from medtransfer.task, which imports torch only to train.
    code = "import sys, medtransfer.config; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_choices_of_other_modules_are_not_checked_here():
    config = TrainConfig.from_dict({"threshold": "median", "precision": "fp8", "strategy": "thaw", "labels": "x"})
    assert (config.threshold, config.precision, config.strategy, config.labels) == ("median", "fp8", "thaw", "x")


# --------------------------------------------------------------------------- --set and the cache folder


def test_set_values_become_settings():
    assert parse_set_values(["label_smoothing=0.1", "warmup-epochs=0", "patient_regex=a=b"]) == {
        "label_smoothing": "0.1", "warmup_epochs": "0", "patient_regex": "a=b"
    }
    assert parse_set_values(None) == {}


def test_set_value_without_equals_sign_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^--set 'lr': expected KEY=VALUE"):
        parse_set_values(["lr"])


def test_default_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDTRANSFER_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MEDTRANSFER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "medtransfer"


# --------------------------------------------------------------------------- resolving `medtransfer train`


def test_new_run_resolves_defaults_yaml_flags_and_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTRANSFER_CACHE", str(tmp_path / "cache"))
    config_file = write(tmp_path / "c.yaml", "data: /d\nepochs: 5\nlr: 0.01\n")
    config, run_dir = resolve_train_config(
        out=tmp_path / "run", resume=None, config_file=config_file, overrides={"epochs": 7, "seed": None}
    )
    assert run_dir == tmp_path / "run"
    assert (config.data, config.epochs, config.lr, config.seed) == ("/d", 7, 0.01, 0)
    assert config.cache_dir == str(tmp_path / "cache")


def test_resumed_run_takes_its_own_config_then_the_flags_that_do_not_change_results(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    TrainConfig.from_dict({"data": "/d", "epochs": 3, "cache_dir": "/c"}).write_yaml(run / CONFIG_FILE)
    config, run_dir = resolve_train_config(
        out=None, resume=run, config_file=None, overrides={"num_workers": 2, "progress": False, "epochs": None}
    )
    assert run_dir == run and (config.data, config.epochs, config.cache_dir, config.num_workers) == ("/d", 3, "/c", 2)


def test_resume_refuses_settings_that_would_change_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    TrainConfig.from_dict({"data": "/d", "epochs": 3}).write_yaml(run / CONFIG_FILE)
    with pytest.raises(ConfigError, match=r"^--resume .*run's own settings, so --epochs, --lr cannot change; leave them out"):
        resolve_train_config(out=None, resume=run, config_file=None, overrides={"epochs": 9, "lr": 0.1, "progress": False})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"out": None, "resume": None, "config_file": None, "overrides": {"data": "/d"}}, r"^--out: required"),
        ({"out": "RUN", "resume": None, "config_file": None, "overrides": {}}, r"^--data: required"),
        ({"out": None, "resume": "RUN", "config_file": None, "overrides": {"data": "/d"}}, r"^--resume: .*leave out --config and --data"),
        ({"out": None, "resume": "RUN", "config_file": "c.yaml", "overrides": {}}, r"^--resume: .*leave out --config"),
        ({"out": "OTHER", "resume": "RUN", "config_file": None, "overrides": {}}, r"^--resume .*leave out --out"),
    ],
)
def test_inconsistent_train_sources_are_config_errors(tmp_path, kwargs, message):
    kwargs = {k: tmp_path / v if isinstance(v, str) and v.isupper() else v for k, v in kwargs.items()}
    with pytest.raises(ConfigError, match=message):
        resolve_train_config(**kwargs)


def test_class_map_class_names_and_test_fraction_from_yaml_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("class_map: {BACTERIA: PNEUMONIA, VIRUS: PNEUMONIA}\nclass_names: [normal, pneumonia]\ntest_fraction: 0.25\n")
    config = TrainConfig.from_sources(path, {})
    assert config.class_map == {"BACTERIA": "PNEUMONIA", "VIRUS": "PNEUMONIA"}
    assert config.class_names == ["normal", "pneumonia"] and config.test_fraction == 0.25
    flags = TrainConfig.from_sources(path, {"class_map": ["A=B"], **parse_set_values(["class_names=x,y", "test_fraction=none"])})
    assert flags.class_map == {"A": "B"} and flags.class_names == ["x", "y"] and flags.test_fraction is None
    assert TrainConfig().test_fraction is None and TrainConfig().class_map == {}
    written = tmp_path / "out.yaml"
    config.write_yaml(written)
    assert TrainConfig.from_sources(written, {}) == config


@pytest.mark.parametrize(
    "values, match",
    [
        ({"class_map": ["BACTERIA"]}, "--class-map 'BACTERIA': expected OLD=NEW"),
        ({"class_map": 3}, "setting 'class_map' got 3"),
        ({"class_names": "a,,b"}, "setting 'class_names' got 'a,,b'; a class name is empty"),
        ({"test_fraction": "half"}, "setting 'test_fraction' got 'half'; expected a number"),
    ],
)
def test_bad_class_settings_are_one_line(values, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_sources(None, values)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["BACTERIA=PNEUMONIA", "VIRUS=PNEUMONIA"], {"BACTERIA": "PNEUMONIA", "VIRUS": "PNEUMONIA"}),
        (["0=NORMAL", "1=PNEUMONIA"], {"0": "NORMAL", "1": "PNEUMONIA"}),
        ([" Normal = NORMAL "], {"Normal": "NORMAL"}),  # spaces around names are dropped
        (["a=b=c"], {"a": "b=c"}),  # the first '=' separates
        (["A=B", "A=B"], {"A": "B"}),  # repeated identically: fine
        ("A=B", {"A": "B"}),  # one string
        ({"COVID-19": "COVID", 0: "NORMAL"}, {"COVID-19": "COVID", "0": "NORMAL"}),  # a YAML mapping
        (None, {}),
        ([], {}),
    ],
)
def test_parse_class_map(values, expected):
    assert parse_class_map(values) == expected


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["PNEUMONIA"], "--class-map 'PNEUMONIA': expected OLD=NEW"),
        (["=PNEUMONIA"], "--class-map '=PNEUMONIA': both the old and the new class name are needed"),
        (["A= "], "--class-map 'A=': both"),
        (["A=B", "A=C"], "--class-map maps 'A' twice (A=B, A=C)"),
    ],
)
def test_parse_class_map_names_the_bad_value(values, message):
    with pytest.raises(ConfigError) as info:
        parse_class_map(values)
    assert message in str(info.value)


# --------------------------------------------------------------------------- augmentation policies


@pytest.mark.parametrize(
    ("value", "policy"),
    [(True, "light"), (False, "none"), ("true", "light"), ("false", "none"), ("off", "none"), ("Trivial", "trivial"),
     ("radiograph", "radiograph")],
)
def test_augment_reads_policies_and_the_old_true_false(value, policy):
    assert TrainConfig.from_dict({"augment": value}).augment == policy
    assert TrainConfig(augment=value if isinstance(value, bool) else policy).augment == policy


def test_an_old_run_folders_config_with_augment_true_resumes_as_light(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    old = {**TrainConfig(data="d").to_dict(), "augment": True}
    del old["mixup"], old["cutmix"], old["augment_on"]  # written before these settings existed
    (run / CONFIG_FILE).write_text(yaml.safe_dump(old))
    config, _ = resolve_train_config(out=None, resume=run, config_file=None, overrides={"augment_on": "workers"})
    assert (config.augment, config.mixup, config.cutmix, config.augment_on) == ("light", 0.0, 0.0, "workers")
    old["augment"] = False
    (run / CONFIG_FILE).write_text(yaml.safe_dump(old))
    assert resolve_train_config(out=None, resume=run, config_file=None, overrides={})[0].augment == "none"


@pytest.mark.parametrize(("values", "flag"), [({"mixup": -0.1}, "--mixup"), ({"cutmix": -1}, "--cutmix")])
def test_mixing_alphas_are_zero_or_positive(values, flag):
    with pytest.raises(ConfigError, match=f"^{flag}: got -"):
        TrainConfig.from_dict(values)
