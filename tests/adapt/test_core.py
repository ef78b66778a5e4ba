"""`adapt` end to end: a model folder every command accepts, what changed named, labels never read, refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from rich.console import Console

from medtransfer.adapt.core import DEFAULT_METHOD, adapt_model
from medtransfer.artifacts import load_model
from medtransfer.errors import ConfigError, DataError
from tests.adapt.conftest import invoke, random_run, unlabelled_folder

QUIET = Console(quiet=True)


def adapt(run, data, out, cache, **options):
    options = {"bootstrap": 100, "permutations": 100, "accelerator": "cpu", "progress": False, "console": QUIET, **options}
    return adapt_model(run, data, out, cache_dir=cache, **options)


def test_the_cli_writes_a_model_that_predict_evaluate_and_export_accept(adapt_run, site_images, tmp_path, capsys):
    run, cache = adapt_run
    out = tmp_path / "adapted"
    assert invoke(["adapt", "--run", run, "--data", site_images, "--out", out, "--cache-dir", cache, "--bootstrap", "100",
                   "--permutations", "100", "--accelerator", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "Verdict:" in printed and "Label-free shift" in printed and "BatchNorm" in printed
    info = json.loads((out / "model" / "model.json").read_text())
    adapted = info["provenance"]["adapted"]
    assert adapted["method"] == DEFAULT_METHOD and adapted["data"]["images"] == 72 and len(adapted["data"]["sha256"]) == 64
    assert adapted["shift"]["verdict"] and info["provenance"]["trained"]["run"]
    assert (out / "model" / "ood.json").is_file()
    record = json.loads((out / "adaptation.json").read_text())
    assert record["ranking"]["spearman"] is not None and record["shift_before"]["features_mmd"]["p_value"] is not None
    image = next(site_images.rglob("*.png"))
    assert invoke(["predict", image, "--run", out, "--csv", tmp_path / "p.csv"]) == 0
    assert invoke(["export", "--run", out]) == 0 and (out / "model" / "model.onnx").is_file()
    assert invoke(["evaluate", "--run", out, "--data", site_images.parent, "--out", tmp_path / "eval", "--cache-dir", cache,
                   "--bootstrap", "20"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["label_free_shift"]["verdict"]  # the run's validation images found through the provenance


def test_a_prior_only_adaptation_changes_the_classifier_bias_and_keeps_the_ranking(adapt_run, site_images, tmp_path):
    run, cache = adapt_run
    record = adapt(run, site_images, tmp_path / "prior", cache, method="prior", max_prior_ci=1.0)
    original, adapted = load_model(run), load_model(tmp_path / "prior")
    before, after = original.model.state_dict(), adapted.model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["fc.bias"]
    assert record["ranking"]["order_unchanged"] and record["ranking"]["auc_change"].startswith("none")
    assert record["ranking"]["decisions_changed"] == 0  # youden keeps its meaning: the same decisions
    prior = record["prior"]
    assert 0 < prior["em"] < 1 and prior["em_ci"][0] <= prior["em"] <= prior["em_ci"][1]
    provenance = adapted.info.provenance["adapted"]
    assert provenance["prevalence"]["estimate"] == prior["em"] and "classifier bias" in provenance["changes"][0]


def test_labels_are_never_read(adapt_run, site_images, tmp_path, monkeypatch):
    run, cache = adapt_run
    first = adapt(run, site_images, tmp_path / "a", cache, method="prior", max_prior_ci=1.0)
    swapped = tmp_path / "swapped"
    shutil.copytree(site_images, swapped)
    (swapped / "NORMAL").rename(swapped / "tmp")
    (swapped / "PNEUMONIA").rename(swapped / "NORMAL")
    (swapped / "tmp").rename(swapped / "PNEUMONIA")

    def no_labels(*args, **kwargs):
        raise AssertionError("adapt asked for labels")

    import medtransfer.data.discover as discover

    monkeypatch.setattr(discover, "discover", no_labels)
    monkeypatch.setattr(discover, "discover_data", no_labels)
    second = adapt(run, swapped, tmp_path / "b", cache, method="prior", max_prior_ci=1.0)
    assert second["data"]["sha256"] == first["data"]["sha256"]
    assert second["prior"]["em"] == pytest.approx(first["prior"]["em"])
    assert second["threshold"] == first["threshold"]


def test_bn_below_the_minimum_is_refused_before_anything_is_written(tmp_path):
    run = random_run(tmp_path / "run")
    data = unlabelled_folder(tmp_path / "site", 20)
    with pytest.raises(DataError, match="20 images; --method bn re-estimates BatchNorm statistics, which needs at least 64"):
        adapt(run, data, tmp_path / "out", tmp_path / "cache", method="bn")
    assert not (tmp_path / "out").exists()


def test_a_site_the_ood_guard_rejects_is_refused(tmp_path):
    run = random_run(tmp_path / "run", detector=True)
    data = unlabelled_folder(tmp_path / "site", 12)
    with pytest.raises(DataError, match=r"the OOD guard flags 100.0% of the images \(limit 25%\)"):
        adapt(run, data, tmp_path / "out", tmp_path / "cache", method="prior")
    assert not (tmp_path / "out").exists()


def test_an_unreliable_prior_estimate_is_refused(tmp_path):
    run = random_run(tmp_path / "run")
    data = unlabelled_folder(tmp_path / "site", 12)
    with pytest.raises(DataError, match="prevalence cannot be estimated reliably"):
        adapt(run, data, tmp_path / "out", tmp_path / "cache", method="prior", max_prior_ci=0.0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options,match", [({"method": "magic"}, "--method: got 'magic'"),
                                           ({"operating_point": "x"}, "--operating-point: got 'x'")])
def test_bad_options_name_the_choices(tmp_path, options, match):
    with pytest.raises(ConfigError, match=match):
        adapt(tmp_path, tmp_path, tmp_path / "out", tmp_path / "cache", **options)


def test_the_out_folder_must_be_new(tmp_path):
    run = random_run(tmp_path / "run")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(ConfigError, match="not an empty folder"):
        adapt(run, unlabelled_folder(tmp_path / "site", 3), tmp_path / "out", tmp_path / "cache", method="prior")


def test_the_cli_default_is_the_measured_default():
    from medtransfer.cli.commands import adapt as command
    import inspect

    assert inspect.signature(command).parameters["method"].default.default == DEFAULT_METHOD


def test_tent_and_prior_plus_bn_write_models_that_load(adapt_run, site_images, tmp_path):
    run, cache = adapt_run
    for method in ("tent", "prior+bn"):
        record = adapt(run, site_images, tmp_path / method, cache, method=method, max_prior_ci=1.0)
        assert not record["ranking"]["order_unchanged"] or record["ranking"]["spearman"] == pytest.approx(1.0)
        saved = load_model(tmp_path / method)
        assert np.isfinite(saved.threshold) and saved.info.provenance["adapted"]["method"] == method
