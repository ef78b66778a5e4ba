"""Heatmaps of a multi-label model: one per finding, the default set at the saved thresholds, --finding.

The model is a randomly initialised ResNet-18 with three sigmoid outputs (findings A, B, C),
saved as a multi-label model.json. Thresholds are set from the probabilities the model gives the
two test images, so that which findings reach their threshold is known: A always (threshold 0),
B never (threshold 1), C for one image only (threshold between the two images' probabilities).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medtransfer.artifacts import load_model, model_info, save_model
from medtransfer.cli import main
from medtransfer.errors import ConfigError
from medtransfer.explain.border import write_border_evidence
from medtransfer.explain.cam import ClassActivationMap
from medtransfer.explain.files import check_findings, explain_files, prepare_images
from medtransfer.explain.gallery import write_gallery
from medtransfer.explain.occlusion import occlusion_sensitivity
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import TransferModel

FINDINGS = ["A", "B", "C"]
TEMPERATURES = [1.5, 0.7, 2.0]


def _save(folder, *, thresholds=(0.5, 0.5, 0.5), classes=FINDINGS, task="multi-label"):
    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=len(classes), weights="none")
    model = TransferModel(net, spec)
    if task == "multi-label":
        operating = {"task": task, "thresholds": list(thresholds), "temperatures": TEMPERATURES, "positive_class": None,
                     "threshold": None}
    else:
        operating = {"positive_class": classes[1], "threshold": 0.5}
    save_model(model, model_info(model, classes=list(classes), image_size=64, decode_size=72, **operating), folder)
    return load_model(folder)


def _images(folder) -> list:
    rng = np.random.default_rng(0)
    paths = [folder / "a.png", folder / "b.png"]
    Image.fromarray(rng.integers(0, 255, (90, 120), dtype=np.uint8), mode="L").save(paths[0])
    Image.fromarray((rng.random((80, 80)) ** 3 * 255).astype(np.uint8), mode="L").save(paths[1])
    return paths


def _probabilities(saved, paths) -> np.ndarray:
    _, batch = prepare_images(saved, paths)
    with torch.no_grad():
        logits = saved.model(batch).double().numpy()
    return 1 / (1 + np.exp(-logits / np.asarray(TEMPERATURES)))


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """(saved model, image paths, probabilities, the findings each image reaches the threshold of), under the
    images' folder: the run folder is ``paths[0].parent / "run"``."""
    tmp_path = tmp_path_factory.mktemp("multilabel")
    paths = _images(tmp_path)
    p = _probabilities(_save(tmp_path / "probe"), paths)
    assert abs(p[0, 2] - p[1, 2]) > 1e-6
    thresholds = (0.0, 1.0, float(p[:, 2].mean()))
    saved = _save(tmp_path / "run", thresholds=thresholds)
    expected = [["A", "C"] if p[i, 2] >= thresholds[2] else ["A"] for i in range(2)]
    assert sorted(map(len, expected)) == [1, 2]
    return saved, paths, p, expected


def _invoke(args, capsys) -> tuple[int, str, str]:
    saved_argv, sys.argv = sys.argv, ["medtransfer", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        sys.argv = saved_argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_default_draws_exactly_the_findings_at_or_above_their_thresholds(tmp_path, known):
    saved, paths, p, expected = known

    rows = explain_files(saved, paths, tmp_path / "out", method="gradcam")

    assert [r["predicted"] for r in rows] == expected
    assert [[h["finding"] for h in r["heatmaps"]] for r in rows] == expected
    written = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert written == sorted(f"{stem}_{f}_gradcam.{ext}" for stem, found in zip("ab", expected) for f in found
                             for ext in ("png", "npy"))
    for i, row in enumerate(rows):
        assert row["probabilities"] == pytest.approx(dict(zip(FINDINGS, p[i])), abs=1e-5)  # sigmoid(logit / T_k)
        for heat in row["heatmaps"]:
            k = FINDINGS.index(heat["finding"])
            assert heat["present"] and heat["threshold"] == row["thresholds"][heat["finding"]]
            assert heat["caption"] == f"{heat['finding']} p={p[i, k]:.2f} (threshold {heat['threshold']:.2f})"
            heat_map = np.load(heat["map"])
            assert heat_map.shape == (64, 64) and heat_map.dtype == np.float32 and 0 <= heat_map.min() <= heat_map.max() <= 1
            assert Image.open(heat["overlay"]).height > 64  # the caption strip
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left


def test_requested_findings_get_one_heatmap_each_whatever_their_probability(tmp_path, known):
    saved, paths, _, _ = known

    rows = explain_files(saved, paths, tmp_path / "out", method="cam", findings=["B", "c", "B"])

    for stem, row in zip("ab", rows):
        assert [h["finding"] for h in row["heatmaps"]] == ["B", "C"]
        assert [h["overlay"].name for h in row["heatmaps"]] == [f"{stem}_B_cam.png", f"{stem}_C_cam.png"]
        assert not row["heatmaps"][0]["present"] and "(below threshold 1.00)" in row["heatmaps"][0]["caption"]
    assert len(list((tmp_path / "out").glob("*.png"))) == len(list((tmp_path / "out").glob("*.npy"))) == 4


@pytest.mark.parametrize("method", ["gradcam", "cam", "layercam", "gradcam++"])
def test_the_map_of_finding_k_is_the_map_of_output_k(tmp_path, known, method):
    saved, paths, _, _ = known

    rows = explain_files(saved, paths, tmp_path / "out", method=method, findings=FINDINGS)

    _, batch = prepare_images(saved, paths)
    with ClassActivationMap(saved.model, method=method) as cam:
        direct = {k: cam(batch, class_index=k).maps.numpy() for k in range(len(FINDINGS))}
    for i, row in enumerate(rows):
        for k, heat in enumerate(row["heatmaps"]):
            np.testing.assert_allclose(np.load(heat["map"]), direct[k][i], atol=1e-5)
    assert not np.allclose(direct[0], direct[2], atol=1e-3)  # the findings' maps differ


def test_an_image_with_no_finding_at_its_threshold_gets_no_heatmap(tmp_path, capsys):
    paths = _images(tmp_path)
    _save(tmp_path / "run", thresholds=(1.0, 1.0, 1.0))

    code, out, err = _invoke(["explain", *paths, "--run", tmp_path / "run", "--out", tmp_path / "out"], capsys)

    assert code == 0, err
    assert out.count("no finding at or above its threshold") == 2 and "--finding" in out
    assert not list((tmp_path / "out").iterdir())


def test_cli_draws_the_requested_finding_and_refuses_unknown_ones(tmp_path, known, capsys):
    _, paths, _, _ = known
    run = paths[0].parent / "run"

    code, out, err = _invoke(["explain", paths[0], "--run", run, "--out", tmp_path / "out", "--finding", "B"], capsys)
    assert code == 0, err
    assert "B p=" in out and "(below threshold 1.00)" in out and (tmp_path / "out" / "a_B_gradcam.png").is_file()

    code, out, err = _invoke(["explain", paths[0], "--run", run, "--out", tmp_path / "out2", "--finding", "Pneumonia",
                              "--finding", "A"], capsys)
    assert code == 1
    assert err.strip().count("\n") == 0  # one line
    assert "--finding 'Pneumonia'" in err and "A, B, C" in err
    assert not (tmp_path / "out2").exists()


def test_a_single_label_model_refuses_finding(tmp_path, capsys):
    paths = _images(tmp_path)
    _save(tmp_path / "run", classes=["NORMAL", "PNEUMONIA"], task="single-label")

    code, _, err = _invoke(["explain", paths[0], "--run", tmp_path / "run", "--out", tmp_path / "out",
                            "--finding", "PNEUMONIA"], capsys)

    assert code == 1 and "--finding is for multi-label models" in err and "NORMAL, PNEUMONIA" in err
    code, _, err = _invoke(["explain", paths[0], "--run", tmp_path / "run", "--out", tmp_path / "out"], capsys)
    assert code == 0 and (tmp_path / "out" / "a_gradcam.png").is_file(), err  # the default is unchanged


def test_check_findings_keeps_the_order_drops_repeats_and_lists_the_choices():
    assert check_findings(["Effusion", "Mass"], ["mass", "Effusion", "Mass"]) == [1, 0]
    with pytest.raises(ConfigError, match=r"--finding 'X', 'y': not a finding of this model; choose from Effusion, Mass$"):
        check_findings(["Effusion", "Mass"], ["X", "Mass", "y"])


class _Halves(nn.Module):
    """Finding 0: the mean of the left half of the image; finding 1: the mean of the right half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.stack([x[..., :half].mean(dim=(1, 2, 3)), x[..., half:].mean(dim=(1, 2, 3))], dim=1)


def test_multilabel_occlusion_scores_the_findings_own_sigmoid():
    image = torch.ones(1, 1, 32, 32)
    image[..., 16:] = -1.0  # occluding the right half raises finding 1's logit

    with ClassActivationMap(_Halves(), method="occlusion", multilabel=True) as cam:
        own = cam(image, class_index=0)
    softmax, _ = occlusion_sensitivity(_Halves(), image, torch.tensor([0]))  # unnormalised

    assert own.maps[0, :, :12].min() > 0 and own.maps[0, :, 20:].abs().max() == 0  # only the left half is evidence
    assert softmax[0, :, 20:].min() > 0  # a softmax mixes finding 1 in
    assert own.probabilities.shape == (1, 2) and torch.allclose(own.probabilities, torch.sigmoid(own.logits))


def test_a_single_output_multilabel_map_targets_the_logit_itself():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
    image = torch.rand(2, 1, 16, 16)
    with ClassActivationMap(net, method="gradcam", target_layer="1", multilabel=True) as cam:
        finding = cam(image, class_index=0)
    with ClassActivationMap(net, method="gradcam", target_layer="1") as cam:
        positive = cam(image, class_index=1)  # single-label: class 1 is the positive logit
    torch.testing.assert_close(finding.maps, positive.maps)
    assert finding.class_index.tolist() == [0, 0]


def test_gallery_refuses_and_border_check_measures_the_top_finding(tmp_path, known):
    saved, paths, p, _ = known
    run = paths[0].parent / "run"
    header = "path,label," + ",".join(f"prob_{f}" for f in FINDINGS) + ",pred\n"
    lines = [f"{path},A,{','.join(str(v) for v in p[i])},A\n" for i, path in enumerate(paths)]
    (run / "predictions_test.csv").write_text(header + "".join(lines))

    with pytest.raises(ConfigError, match="multi-label.*medtransfer explain IMAGES --run .* --finding NAME"):
        write_gallery(run, saved)
    block = write_border_evidence(run, saved, method="gradcam")

    assert block["n_images"] == 2 and block["explained"].startswith("top finding")
    assert all("(A)" in item["caption"] for item in block["gallery"])  # threshold 0: A is furthest above
    assert all((run / item["image"]).is_file() for item in block["gallery"])
    json.dumps(block)
