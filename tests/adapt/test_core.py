"""`adapt` end to end: a model folder every command accepts, what changed named, labels never read, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from rich.console import Console

from medtransfer.adapt.core import DEFAULT_METHOD, adapt_model
from medtransfer.artifacts import load_model
from medtransfer.errors import ConfigError, DataError
from tests.adapt.conftest import brightness_image, brightness_run, invoke, random_run, unlabelled_folder

QUIET = Console(quiet=True)


def adapt(run, data, out, cache, **options):
    options = {"bootstrap": 100, "permutations": 100, "accelerator": "cpu", "progress": False, "console": QUIET, **options}
    return adapt_model(run, data, out, cache_dir=cache, **options)


def bright_site(folder, count: int = 80, share: float = 0.25, **appearance):
    """`count` images, `share` of them bright (PNEUMONIA to brightness_run), filed under misleading folder names."""
    for i in range(count):
        bright = i < round(share * count)
        brightness_image(folder / ("NORMAL" if bright else "PNEUMONIA") / f"s{i:03d}.png", bright, seed=1000 + i,
                         **appearance)
    return folder


ANOTHER_SCANNER = {"share": 0.5, "contrast": 0.6, "offset": 60.0}  # the same classes, other grey levels


def test_the_cli_writes_a_model_that_predict_serve_export_and_evaluate_accept(tmp_path, capsys):
    run = brightness_run(tmp_path / "run", detector=True)
    site, cache, out = bright_site(tmp_path / "site", **ANOTHER_SCANNER), tmp_path / "cache", tmp_path / "adapted"
    assert invoke(["adapt", "--run", run, "--data", site, "--out", out, "--cache-dir", cache, "--bootstrap", "100",
                   "--permutations", "100", "--accelerator", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "Verdict: appearance shift" in printed and "Label-free shift" in printed and "Shifted mixture" in printed
    info = json.loads((out / "model" / "model.json").read_text())
    adapted = info["provenance"]["adapted"]
    assert adapted["method"] == DEFAULT_METHOD and adapted["data"]["images"] == 80 and len(adapted["data"]["sha256"]) == 64
    assert adapted["shift"]["verdict"].startswith("appearance shift") and info["provenance"]["trained"]["run"]
    assert (out / "model" / "ood.json").is_file() and load_model(out).ood is not None
    record = json.loads((out / "adaptation.json").read_text())
    assert record["ranking"]["order_unchanged"] and record["shift_before"]["features_mmd"]["p_value"] < 0.05
    image = next(site.rglob("*.png"))
    assert invoke(["predict", image, "--run", out, "--csv", tmp_path / "p.csv"]) == 0
    assert invoke(["export", "--run", out]) == 0 and (out / "model" / "model.onnx").is_file()
    from fastapi.testclient import TestClient

    from medtransfer.serving.app import create_app

    answer = TestClient(create_app(load_model(out), run_dir=out)).post(
        "/predict", files={"file": (image.name, image.read_bytes(), "image/png")})
    assert answer.status_code == 200 and answer.json()["threshold"] == pytest.approx(load_model(out).threshold)
    labelled = tmp_path / "labelled" / "test"
    for i in range(40):
        brightness_image(labelled / ("PNEUMONIA" if i % 2 else "NORMAL") / f"l{i}.png", i % 2 == 1, seed=3000 + i,
                         contrast=0.6, offset=60.0)
    assert invoke(["evaluate", "--run", out, "--data", labelled.parent, "--out", tmp_path / "eval", "--cache-dir", cache,
                   "--bootstrap", "20"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["label_free_shift"]["verdict"]  # the run's validation images found through the provenance


def test_a_prior_only_adaptation_recovers_the_prior_changes_the_bias_and_keeps_the_ranking(tmp_path):
    run = brightness_run(tmp_path / "run")
    record = adapt(run, bright_site(tmp_path / "site"), tmp_path / "prior", tmp_path / "cache", method="prior")
    prior = record["prior"]
    assert prior["source_prior"] == 0.5 and prior["em"] == pytest.approx(0.25, abs=0.05)
    assert prior["em_ci"][0] <= prior["em"] <= prior["em_ci"][1] and prior["bbse"] == pytest.approx(0.25, abs=0.05)
    original, adapted = load_model(run), load_model(tmp_path / "prior")
    before, after = original.model.state_dict(), adapted.model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["net.fc.bias"]
    assert record["ranking"]["order_unchanged"] and record["ranking"]["auc_change"].startswith("none")
    assert record["ranking"]["decisions_changed"] == 0  # youden keeps its meaning: the same decisions
    assert adapted.threshold < original.threshold  # ... at a threshold that moved with the posterior
    provenance = adapted.info.provenance["adapted"]
    assert provenance["prevalence"]["estimate"] == prior["em"] and "classifier bias" in provenance["changes"][0]
    assert record["verdict"]["kind"] == "prevalence" and record["verdict"]["verdict"] == "prevalence shift, adapted"


def test_bayes_moves_the_decisions_with_the_prior(tmp_path):
    run = brightness_run(tmp_path / "run")
    record = adapt(run, bright_site(tmp_path / "site"), tmp_path / "out", tmp_path / "cache", method="prior",
                   operating_point="bayes")
    assert record["threshold"]["after"] == record["threshold"]["before"]
    assert record["ranking"]["positive_calls_after"] <= record["ranking"]["positive_calls_before"]


def test_labels_are_never_read(tmp_path, monkeypatch):
    run = brightness_run(tmp_path / "run")
    site = bright_site(tmp_path / "site")
    first = adapt(run, site, tmp_path / "a", tmp_path / "cache", method="prior")
    (site / "NORMAL").rename(site / "tmp")  # every folder name now says the opposite
    (site / "PNEUMONIA").rename(site / "NORMAL")
    (site / "tmp").rename(site / "PNEUMONIA")

    def no_labels(*args, **kwargs):
        raise AssertionError("adapt asked for labels")

    import medtransfer.data.discover as discover

    monkeypatch.setattr(discover, "discover", no_labels)
    monkeypatch.setattr(discover, "discover_data", no_labels)
    second = adapt(run, site, tmp_path / "b", tmp_path / "cache", method="prior")
    assert second["data"]["sha256"] == first["data"]["sha256"]
    assert second["prior"]["em"] == pytest.approx(first["prior"]["em"])
    assert second["threshold"]["after"] == pytest.approx(first["threshold"]["after"])


def test_bn_and_tent_undo_an_appearance_shift_and_say_the_ranking_changed(tmp_path):
    run = brightness_run(tmp_path / "run")
    site = bright_site(tmp_path / "site", **ANOTHER_SCANNER)
    for method in ("bn", "tent"):
        record = adapt(run, site, tmp_path / method, tmp_path / "cache", method=method)
        saved = load_model(tmp_path / method)
        assert saved.info.provenance["adapted"]["method"] == method and saved.threshold == load_model(run).threshold
        assert any(change.startswith("BatchNorm: ") and "running_mean, running_var" in change for change in record["changes"])
        assert record["ranking"]["spearman"] is not None and record["shift_after"]["verdict"]
        z = [d["matched_reference"]["features_mmd"]["z"] for d in (record["shift_before"], record["shift_after"])]
        assert z[1] < z[0]  # the new images' features moved towards the validation images
        assert any(check.startswith("BatchNorm: 80 images") for check in record["checks"])


@pytest.mark.parametrize("method,share", [("prior", 0.25), ("bn", 0.5)])
def test_the_written_model_scores_the_new_images_as_the_adaptation_did(tmp_path, method, share):
    from medtransfer.adapt.core import adapt_images
    from medtransfer.adapt.images import list_unlabelled
    from medtransfer.evaluation.site_shift import score_images

    run = brightness_run(tmp_path / "run")
    site, cache = bright_site(tmp_path / "site", **{**ANOTHER_SCANNER, "share": share}), tmp_path / "cache"
    in_memory = adapt_images(load_model(run), run, list_unlabelled(site), method=method, cache_dir=cache,
                             bootstrap=100, permutations=100, accelerator="cpu", max_prior_ci=1.0)
    adapt(run, site, tmp_path / "out", cache, method=method, max_prior_ci=1.0)
    written = load_model(tmp_path / "out")
    logits = score_images(written, in_memory.outputs.paths, cache_dir=cache, accelerator="cpu").logits
    np.testing.assert_allclose(logits, in_memory.outputs.logits, atol=0.03)  # bfloat16 inference on the CPU
    assert written.threshold == pytest.approx(in_memory.model.threshold)


def test_the_mixture_moves_temperature_bias_and_threshold_and_keeps_the_ranking(tmp_path):
    run = brightness_run(tmp_path / "run")
    record = adapt(run, bright_site(tmp_path / "site", **ANOTHER_SCANNER), tmp_path / "out", tmp_path / "cache",
                   method="mixture")
    original, adapted = load_model(run), load_model(tmp_path / "out")
    before, after = original.model.state_dict(), adapted.model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["net.fc.bias"]
    assert adapted.temperature != original.temperature and adapted.threshold != original.threshold
    assert record["ranking"]["order_unchanged"] and record["mixture"]["fit"]["converged"]
    assert abs(record["mixture"]["fit"]["prevalence"] - 0.5) < 0.15
    assert any(check.startswith("mixture: KS p") for check in record["checks"])
    assert adapted.info.provenance["adapted"]["mixture"]["cut_ci"]


def test_an_unreliable_mixture_is_refused(tmp_path):
    run = brightness_run(tmp_path / "run")
    with pytest.raises(DataError, match="the shifted-mixture fit is not reliable"):
        adapt(run, bright_site(tmp_path / "site", count=30), tmp_path / "out", tmp_path / "cache", method="mixture",
              max_prior_ci=0.01)
    assert not (tmp_path / "out").exists()


def test_bn_on_a_pure_prevalence_shift_is_refused(tmp_path):
    """AdaBN centres every layer on the new site's mix of classes: under a prevalence shift it would change what the
    model calls. The tests see that the images differ only as a new prevalence explains, and bn refuses."""
    run = brightness_run(tmp_path / "run")
    for method in ("bn", "prior+bn"):
        with pytest.raises(DataError, match="differ from validation only as a change of prevalence"):
            adapt(run, bright_site(tmp_path / "site"), tmp_path / "out", tmp_path / "cache", method=method)
        assert not (tmp_path / "out").exists()


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


def test_the_adapted_folder_names_the_run_relative_to_itself_and_no_local_folder(tmp_path, monkeypatch):
    from medtransfer.evaluation.site_shift import run_root
    from tests.tiny_runs import fake_home, local_mentions, local_needles

    home = fake_home(tmp_path, monkeypatch)
    run = brightness_run(home / "runs" / "demo")
    out = home / "adapted"
    record = adapt(run, bright_site(home / "site", count=40), out, home / "cache", method="prior")

    info = json.loads((out / "model" / "model.json").read_text())
    written = json.loads((out / "adaptation.json").read_text())
    assert record == written and (written["run"], written["data"]["data"]) == ("../runs/demo", "site")
    assert info["provenance"]["trained"]["run"] == info["provenance"]["adapted"]["run"] == "../runs/demo"
    assert run_root(out).resolve() == run.resolve()  # evaluate and adapt --run NEW find the run's validation images
    assert local_mentions(out, *local_needles(tmp_path, home)) == []
