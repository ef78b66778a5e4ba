"""artifacts: model.json as a validated ModelInfo, save/load without pickle, preprocess exactly as
evaluation does, and decide() at the saved operating point."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from scipy.special import softmax

from medtransfer.artifacts import ModelInfo, load_model, model_info, save_model
from medtransfer.data.cache import CacheSettings, ImageCache
from medtransfer.data.datamodule import CachedImageDataset
from medtransfer.errors import ConfigError, DataError, WeightsError
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import TransferModel

FIXTURE = Path(__file__).parent / "fixtures" / "model_json_v1.json"  # written by the code before ModelInfo existed


def saved_run(folder: Path, *, classes=("NORMAL", "PNEUMONIA"), positive="PNEUMONIA", in_channels=3, **settings) -> Path:
    """A random-weight resnet18 saved as `medtransfer train` saves it; returns the run folder."""
    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=len(classes), weights="none", in_channels=in_channels)
    model = TransferModel(net, spec)
    settings = {"threshold": 0.41, "image_size": 48, "decode_size": 56, **settings}
    save_model(model, model_info(model, classes=list(classes), positive_class=positive, in_channels=in_channels, **settings),
               folder)
    return folder


def fixture_run(folder: Path, payload: dict | None = None) -> Path:
    """Today's model.json (or `payload`) beside weights that fit it."""
    net, _ = create_backbone("resnet18", num_classes=2, weights="none")
    (folder / "model").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model" / "weights.safetensors"))
    if payload is None:
        shutil.copy(FIXTURE, folder / "model" / "model.json")
    else:
        (folder / "model" / "model.json").write_text(json.dumps(payload))
    return folder


# ---------------------------------------------------------------------- save / load


def test_save_and_load_round_trip(tmp_path):
    run = saved_run(tmp_path / "run", temperature=1.7, threshold_policy="youden", strategy="freeze", frozen=["conv1"],
                    training_config={"lr": 0.01, "crop_scale": [0.6, 1.0]})
    saved = load_model(run)
    assert dataclasses.replace(saved.info, versions=None) == ModelInfo(
        backbone="resnet18", classes=("NORMAL", "PNEUMONIA"), positive_class="PNEUMONIA", threshold=0.41,
        temperature=1.7, image_size=48, decode_size=56, eval_crop_fraction=0.875, mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), in_channels=3, output_stride=32, threshold_policy="youden", strategy="freeze",
        frozen=("conv1",), training_config={"lr": 0.01, "crop_scale": [0.6, 1.0]},
    )
    assert set(saved.info.versions) == {"medtransfer", "torch", "torchvision", "timm", "lightning", "python"}
    written = json.loads((run / "model" / "model.json").read_text())
    assert list(written) == ["format_version", "backbone", "classes", "positive_class", "threshold", "temperature",
                             "image_size", "decode_size", "eval_crop_fraction", "mean", "std", "in_channels",
                             "output_stride", "threshold_policy", "strategy", "frozen", "training_config", "versions",
                             "tta"]
    reference = saved_run(tmp_path / "again")  # same seed, same weights
    original = load_model(reference).model.net.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in saved.model.net.state_dict().items())
    assert not saved.model.training
    assert load_model(run / "model").info == saved.info  # the model/ folder itself is accepted too


def test_optional_fields_left_unset_are_not_written(tmp_path):
    written = json.loads((saved_run(tmp_path / "run") / "model" / "model.json").read_text())
    assert not {"threshold_policy", "strategy", "frozen", "training_config", "border_crop"} & set(written)
    assert load_model(tmp_path / "run").info.threshold_policy is None


def test_model_json_written_by_todays_code_loads(tmp_path):
    saved = load_model(fixture_run(tmp_path / "run"))
    stored = json.loads(FIXTURE.read_text())
    assert {"format_version": 1, **saved.info.to_json()} == stored  # nothing lost, nothing renamed
    assert saved.classes == ["NORMAL", "PNEUMONIA"] and saved.positive_index == 1
    assert (saved.threshold, saved.temperature) == (0.4187, 1.3125)
    assert saved.info.frozen == ("conv1", "bn1", "relu", "maxpool") and saved.info.training_config["epochs"] == 12


def test_model_json_from_before_tta_and_ensembles_loads_as_one_model_without_tta(tmp_path):
    old = Path(__file__).parent / "fixtures" / "model_json_before_tta.json"  # as the code before TTA wrote it
    saved = load_model(fixture_run(tmp_path / "run", json.loads(old.read_text())))
    assert (saved.info.tta, saved.info.members, saved.extra) == ("none", None, ())
    assert saved.network is saved.model  # nothing averaged: the model itself predicts


def test_ensemble_members_round_trip_and_average_their_logits(tmp_path):
    models = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        net, spec = create_backbone("resnet18", num_classes=2, weights="none")
        models.append(TransferModel(net, spec).eval())
    info = model_info(models[0], classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", threshold=0.5,
                      image_size=48, decode_size=56)
    save_model(models[0], info, tmp_path / "ens", extra=(models[1],))
    saved = load_model(tmp_path / "ens")
    assert saved.info.members == ("weights.safetensors", "member_2.safetensors") and len(saved.extra) == 1
    batch = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = (models[0](batch) + models[1](batch)) / 2
        torch.testing.assert_close(saved.network(batch), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(saved.model(batch), models[0](batch), rtol=0, atol=1e-6)  # explain's member


def test_missing_member_weights_name_the_file(tmp_path):
    payload = {**json.loads(FIXTURE.read_text()), "members": ["weights.safetensors", "member_2.safetensors"]}
    with pytest.raises(WeightsError, match=r"member_2.safetensors is missing; the model folder is incomplete"):
        load_model(fixture_run(tmp_path / "run", payload))


@pytest.mark.parametrize("field,value,expected", [
    ("tta", "rotate", "field 'tta' must be one of none, crops, flip; got 'rotate'"),
    ("members", ["../x.safetensors"], "field 'members' must be a list of distinct .safetensors file names"),
])
def test_bad_tta_and_members_fields_are_refused(tmp_path, field, value, expected):
    payload = {**json.loads(FIXTURE.read_text()), field: value}
    with pytest.raises(WeightsError, match=re.escape(expected)):
        load_model(fixture_run(tmp_path / "run", payload))


def test_with_tta_overrides_the_views_and_keeps_the_operating_point(tmp_path):
    saved = load_model(saved_run(tmp_path / "run", temperature=1.4))
    crops = saved.with_tta("crops")
    assert crops.info.tta == "crops" and crops.threshold == saved.threshold and saved.with_tta(None) is saved
    assert len(crops.network(torch.zeros(1, 3, 48, 48))) == 1


def test_model_json_from_before_output_stride_loads_with_the_undilated_network(tmp_path):
    payload = json.loads(FIXTURE.read_text())
    del payload["output_stride"], payload["versions"]
    assert load_model(fixture_run(tmp_path / "run", payload)).info.output_stride == 32


def test_loading_never_unpickles(tmp_path, monkeypatch):
    run = saved_run(tmp_path / "run")

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr("torch.load", forbidden)
    saved = load_model(run)
    assert saved.classes == ["NORMAL", "PNEUMONIA"] and saved.threshold == 0.41


# ---------------------------------------------------------------------- validation

MISSING = object()


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("classes", MISSING, "is missing"),
        ("decode_size", MISSING, "is missing"),
        ("threshold", "high", "must be a number between 0 and 1"),
        ("threshold", 1.5, "must be a number between 0 and 1"),
        ("threshold", True, "must be a number between 0 and 1"),
        ("classes", ["NORMAL"], "at least 2 distinct class names"),
        ("classes", ["A", "A"], "at least 2 distinct class names"),
        ("positive_class", "COVID", "must be one of the classes (NORMAL, PNEUMONIA)"),
        ("image_size", 0, "whole number of pixels"),
        ("image_size", 22.5, "whole number of pixels"),
        ("mean", [0.5, 0.5], "1 or 3 numbers"),
        ("std", [0.2], "as many values as 'mean'"),
        ("std", [0.2, 0.0, 0.2], "numbers > 0"),
        ("in_channels", 2, "must be 1 or 3"),
        ("output_stride", 7, "must be one of 32, 16, 8"),
        ("temperature", 0, "must be a number > 0"),
        ("eval_crop_fraction", 1.2, "in (0, 1]"),
        ("training_config", "lr=1", "object of setting: value"),
    ],
)
def test_a_bad_field_is_refused_naming_file_field_and_value(field, value, expected):
    payload = json.loads(FIXTURE.read_text())
    if value is MISSING:
        del payload[field]
    else:
        payload[field] = value
    with pytest.raises(WeightsError) as error:
        ModelInfo.from_json(payload, source="runs/x/model/model.json")
    message = str(error.value)
    assert message.startswith(f"runs/x/model/model.json: field '{field}' ")
    assert expected in message and "medtransfer train" in message
    if value is not MISSING:
        assert f"got {value!r}" in message


def test_a_newer_format_is_refused(tmp_path):
    payload = {**json.loads(FIXTURE.read_text()), "format_version": 2}
    with pytest.raises(WeightsError, match=r"model\.json: field 'format_version' must be 1; got 2"):
        load_model(fixture_run(tmp_path / "run", payload))


@pytest.mark.parametrize("text, expected", [("{", "not valid JSON"), ("[1, 2]", "must hold a JSON object; got list")])
def test_unreadable_model_json_names_the_file(tmp_path, text, expected):
    run = fixture_run(tmp_path / "run")
    (run / "model" / "model.json").write_text(text)
    with pytest.raises(WeightsError, match=expected) as error:
        load_model(run)
    assert str(run / "model" / "model.json") in str(error.value)


def test_an_unknown_backbone_names_the_field(tmp_path):
    payload = {**json.loads(FIXTURE.read_text()), "backbone": "resnet_unheard_of"}
    with pytest.raises(WeightsError, match=r"model\.json: field 'backbone' 'resnet_unheard_of'"):
        load_model(fixture_run(tmp_path / "run", payload))


# ---------------------------------------------------------------------- preprocess


@pytest.mark.parametrize("in_channels", [3, 1])
def test_preprocess_is_bit_for_bit_the_evaluation_path(tmp_path, make_image, in_channels):
    saved = load_model(saved_run(tmp_path / "run", in_channels=in_channels))
    paths = [make_image(tmp_path / "gray.png", size=(120, 90)), make_image(tmp_path / "color.jpg", "RGB", size=(70, 130)),
             make_image(tmp_path / "small.png", "RGB", size=(20, 20))]
    # evaluation: the cache at the saved decode size, then the saved transform (evaluation/external.py)
    images = ImageCache(tmp_path / "cache", CacheSettings(size=saved.info.decode_size)).build(paths)
    evaluated = CachedImageDataset(images, [0] * len(paths), saved.transform())
    for i, path in enumerate(paths):
        expected = evaluated[i][0]
        assert expected.shape == (in_channels, 48, 48) and expected.dtype == torch.float32
        assert torch.equal(saved.preprocess(path), expected)
        assert torch.equal(saved.preprocess(str(path)), expected)
        assert torch.equal(saved.preprocess(path.read_bytes()), expected)
        assert torch.equal(saved.preprocess(np.array(images[i])), expected)  # an already decoded image
        cropped = saved.crop(saved.decode(path))
        assert cropped.dtype == torch.uint8 and cropped.shape[-2:] == (48, 48)
        assert torch.equal(saved.normalise(cropped), expected)


def test_preprocess_decodes_a_full_size_array_as_its_png_file(tmp_path, make_image):
    saved = load_model(saved_run(tmp_path / "run"))
    path = make_image(tmp_path / "large.png", "RGB", size=(300, 200))
    assert torch.equal(saved.preprocess(np.asarray(Image.open(path))), saved.preprocess(path))


def test_preprocess_refuses_what_is_not_an_image(tmp_path):
    saved = load_model(saved_run(tmp_path / "run"))
    with pytest.raises(DataError, match="not a readable image"):
        saved.preprocess(b"not an image")
    with pytest.raises(DataError, match=r"image array: got shape \(4, 4, 5\), dtype float64"):
        saved.preprocess(np.zeros((4, 4, 5)))


# ---------------------------------------------------------------------- decide


@pytest.mark.parametrize(
    "positive, threshold, temperature",
    [("PNEUMONIA", 0.41, 1.0), ("PNEUMONIA", 0.5, 2.0), ("NORMAL", 0.7, 0.5), ("NORMAL", 0.2, 1.3)],
)
def test_decide_binary_applies_the_saved_threshold_to_the_positive_class(tmp_path, positive, threshold, temperature):
    saved = load_model(saved_run(tmp_path / "run", positive=positive, threshold=threshold, temperature=temperature))
    logits = np.array([[0.0, 0.0], [2.0, -1.0], [-1.0, 2.0], [0.3, 0.1], [0.1, 0.3], [5.0, 5.0]], dtype=np.float32)
    decision = saved.decide(logits)
    expected_probabilities = softmax(logits.astype(np.float64) / temperature, axis=1)
    np.testing.assert_allclose(decision.probabilities, expected_probabilities, rtol=0, atol=1e-15)
    p = expected_probabilities[:, saved.positive_index]
    assert decision.predicted.tolist() == [saved.positive_index if q >= threshold else 1 - saved.positive_index for q in p]
    assert saved.decide(torch.from_numpy(logits)).predicted.tolist() == decision.predicted.tolist()


def test_decide_three_classes_is_the_argmax_whatever_the_threshold(tmp_path):
    saved = load_model(saved_run(tmp_path / "run", classes=("BACTERIA", "NORMAL", "VIRUS"), positive="BACTERIA",
                                 threshold=0.05, temperature=1.5))
    logits = np.random.default_rng(0).normal(size=(20, 3))
    decision = saved.decide(logits)
    np.testing.assert_allclose(decision.probabilities, softmax(logits / 1.5, axis=1), rtol=0, atol=1e-15)
    assert decision.predicted.tolist() == logits.argmax(axis=1).tolist()


def test_decide_refuses_logits_of_the_wrong_shape(tmp_path):
    saved = load_model(saved_run(tmp_path / "run"))
    with pytest.raises(DataError, match=r"got shape \(3,\)"):
        saved.decide(np.zeros(3))


# ---------------------------------------------------------------------- multi-label


def test_a_multilabel_model_round_trips_with_one_threshold_and_temperature_per_finding(tmp_path):
    from medtransfer.task import Task
    from tests.saved_multilabel import FINDINGS, TEMPERATURES, THRESHOLDS, save_multilabel_model

    run = save_multilabel_model(tmp_path / "run", threshold_policy="youden")
    written = json.loads((run / "model" / "model.json").read_text())
    assert list(written)[:6] == ["format_version", "backbone", "task", "classes", "thresholds", "temperatures"]
    assert written["task"] == "multi-label" and written["thresholds"] == THRESHOLDS
    assert not {"positive_class", "threshold", "temperature"} & set(written)  # no single-label operating point
    saved = load_model(run)
    assert (saved.info.task, saved.info.classes) == ("multi-label", tuple(FINDINGS))
    assert (saved.info.thresholds, saved.info.temperatures) == (tuple(THRESHOLDS), tuple(TEMPERATURES))
    assert (saved.info.positive_class, saved.threshold) == (None, None)
    assert saved.task == saved.info.task_object == Task("multi-label", tuple(FINDINGS))
    assert {"format_version": 1, **saved.info.to_json()} == written
    with pytest.raises(ConfigError, match="multi-label model has no positive class"):
        saved.positive_index


def test_a_single_label_model_json_without_task_loads_as_single_label(tmp_path):
    assert "task" not in json.loads(FIXTURE.read_text())
    saved = load_model(fixture_run(tmp_path / "run"))
    assert saved.info.task == "single-label" and not saved.task.multilabel
    assert saved.info.thresholds is None and saved.info.temperatures is None
    assert "task" not in saved.info.to_json()  # single-label files are written as before


def test_decide_multilabel_is_the_calibrated_sigmoid_of_each_finding_at_its_threshold(tmp_path):
    from tests.saved_multilabel import TEMPERATURES, THRESHOLDS, save_multilabel_model

    saved = load_model(save_multilabel_model(tmp_path / "run", thresholds=[0.3, 0.5, 0.7, 0.9]))
    logits = np.random.default_rng(0).normal(scale=2.0, size=(64, 4)).astype(np.float32)
    decision = saved.decide(torch.from_numpy(logits))
    expected = 1 / (1 + np.exp(-logits.astype(np.float64) / np.asarray(TEMPERATURES)))
    np.testing.assert_allclose(decision.probabilities, expected, rtol=0, atol=1e-12)
    assert decision.predicted.shape == (64, 4) and set(np.unique(decision.predicted)) == {0, 1}
    np.testing.assert_array_equal(decision.predicted, (expected >= np.asarray([0.3, 0.5, 0.7, 0.9])).astype(int))
    assert THRESHOLDS != [0.3, 0.5, 0.7, 0.9]  # the saved thresholds, not the helper's defaults, decided
    with pytest.raises(DataError, match=r"got shape \(2, 3\)"):
        saved.decide(np.zeros((2, 3)))


def multilabel_payload(**changes) -> dict:
    payload = {key: value for key, value in json.loads(FIXTURE.read_text()).items()
               if key not in ("positive_class", "threshold", "temperature")}
    payload.update(task="multi-label", classes=["Effusion", "Mass", "Nodule"], thresholds=[0.2, 0.5, 0.7],
                   temperatures=[1.0, 1.2, 0.9])
    for key, value in changes.items():
        if value is MISSING:
            del payload[key]
        else:
            payload[key] = value
    return payload


@pytest.mark.parametrize(
    "changes, field, expected",
    [
        ({"thresholds": [0.2, 0.5]}, "thresholds", "must be a list of 3 numbers between 0 and 1, one per finding "
                                                   "(Effusion, Mass, Nodule); got [0.2, 0.5]"),
        ({"thresholds": [0.2, 0.5, 1.5]}, "thresholds", "must be a list of 3 numbers between 0 and 1"),
        ({"thresholds": "0.5"}, "thresholds", "numbers between 0 and 1, one per finding; got '0.5'"),
        ({"temperatures": [1.0, 0.0, 1.0]}, "temperatures", "must be a list of 3 numbers > 0"),
        ({"temperatures": [1.0]}, "temperatures", "must be a list of 3 numbers > 0"),
        ({"thresholds": MISSING}, "thresholds", "is missing; a multi-label model needs one per finding"),
        ({"temperatures": MISSING}, "temperatures", "is missing"),
        ({"positive_class": "Mass"}, "positive_class", "is for single-label models"),
        ({"threshold": 0.5}, "threshold", "is for single-label models; a multi-label model has 'thresholds'"),
        ({"temperature": 1.3}, "temperature", "is for single-label models"),
        ({"classes": []}, "classes", "at least 1 distinct finding name"),
        ({"classes": ["Mass", "Mass", "Nodule"]}, "classes", "at least 1 distinct finding name"),
        ({"task": "multi"}, "task", "must be one of single-label, multi-label; got 'multi'"),
    ],
)
def test_a_bad_multilabel_field_is_refused_naming_it(changes, field, expected):
    with pytest.raises(WeightsError) as error:
        ModelInfo.from_json(multilabel_payload(**changes), source="runs/x/model/model.json")
    message = str(error.value)
    assert message.startswith(f"runs/x/model/model.json: field '{field}' ") and expected in message
    assert "medtransfer train" in message


def test_a_multilabel_payload_loads_and_one_finding_is_enough():
    assert ModelInfo.from_json(multilabel_payload(), source="m.json").thresholds == (0.2, 0.5, 0.7)
    info = ModelInfo.from_json(multilabel_payload(classes=["Mass"], thresholds=[0.4], temperatures=[1.1]), source="m")
    assert info.classes == ("Mass",) and info.task_object.num_outputs == 1


@pytest.mark.parametrize("field", ["thresholds", "temperatures"])
def test_a_single_label_model_json_with_per_finding_lists_is_refused(field):
    payload = {**json.loads(FIXTURE.read_text()), field: [0.5, 0.5]}
    with pytest.raises(WeightsError, match=rf"field '{field}' is only for multi-label models \(task 'multi-label'\)"):
        ModelInfo.from_json(payload, source="m.json")


def test_save_model_refuses_a_multilabel_info_with_the_wrong_number_of_thresholds(tmp_path):
    from tests.saved_multilabel import save_multilabel_model

    with pytest.raises(WeightsError, match=r"field 'thresholds' must be a list of 4 numbers"):
        save_multilabel_model(tmp_path / "run", thresholds=[0.5, 0.5])
    assert not (tmp_path / "run" / "model" / "model.json").exists()
    with pytest.raises(WeightsError, match=r"field 'positive_class' is missing"):  # single-label still needs it
        saved_run(tmp_path / "single", positive=None)
