"""CAM gallery: which images are picked, captions, files written, and what the report shows."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medtransfer.artifacts import load_model, model_info, save_model
from medtransfer.errors import ConfigError, DataError
from medtransfer.explain.gallery import PredictionRow, caption, gallery_rows, select_gallery, write_gallery
from medtransfer.models.backbones import create_backbone
from medtransfer.models.strategies import TransferModel

BINARY = ["NORMAL", "PNEUMONIA"]


def _row(name: str, label: str, predicted: str, p_pneumonia: float) -> PredictionRow:
    return PredictionRow(Path(f"{name}.png"), label, predicted, {"NORMAL": 1 - p_pneumonia, "PNEUMONIA": p_pneumonia})


# label, predicted, p(PNEUMONIA); threshold 0.4
BINARY_ROWS = [
    _row("tp-high", "PNEUMONIA", "PNEUMONIA", 0.99),
    _row("tp-mid", "PNEUMONIA", "PNEUMONIA", 0.80),
    _row("tp-low", "PNEUMONIA", "PNEUMONIA", 0.45),
    _row("fp-high", "NORMAL", "PNEUMONIA", 0.95),
    _row("fp-low", "NORMAL", "PNEUMONIA", 0.42),
    _row("fn-sure", "PNEUMONIA", "NORMAL", 0.02),
    _row("fn-close", "PNEUMONIA", "NORMAL", 0.35),
    _row("tn-sure", "NORMAL", "NORMAL", 0.01),
    _row("tn-close", "NORMAL", "NORMAL", 0.30),
]


@pytest.mark.parametrize(
    "per_group, expected",
    [
        (
            1,
            {"tp": ["tp-high"], "fp": ["fp-high"], "fn": ["fn-sure"], "tn": ["tn-sure"], "loss": ["fn-sure"]},
        ),
        (
            2,
            {
                "tp": ["tp-high", "tp-mid"],
                "fp": ["fp-high", "fp-low"],
                "fn": ["fn-sure", "fn-close"],
                "tn": ["tn-sure", "tn-close"],
                "loss": ["fn-sure", "fp-high"],  # -log 0.02 > -log 0.05
            },
        ),
    ],
)
def test_binary_groups_pick_the_most_confident_and_the_most_confidently_wrong(per_group, expected):
    groups = select_gallery(BINARY_ROWS, BINARY, positive_class="PNEUMONIA", per_group=per_group)
    assert {g.key: [r.path.stem for r in g.rows] for g in groups} == expected
    assert [g.key for g in groups] == ["tp", "fp", "fn", "tn", "loss"]


def test_positive_class_decides_which_cell_is_a_false_positive():
    groups = select_gallery(BINARY_ROWS, BINARY, positive_class="NORMAL", per_group=1)
    by_key = {g.key: g.rows[0].path.stem for g in groups}
    assert by_key["fp"] == "fn-sure" and by_key["tp"] == "tn-sure"


def test_empty_groups_are_left_out():
    rows = [r for r in BINARY_ROWS if not r.path.stem.startswith("fp")]
    assert [g.key for g in select_gallery(rows, BINARY, positive_class="PNEUMONIA")] == ["tp", "fn", "tn", "loss"]


def test_multiclass_groups_are_confident_correct_per_class_and_top_losses():
    classes = ["a", "b", "c"]

    def row(name, label, predicted, probs):
        return PredictionRow(Path(name), label, predicted, dict(zip(classes, probs)))

    rows = [
        row("a1", "a", "a", (0.9, 0.05, 0.05)),
        row("a2", "a", "a", (0.6, 0.2, 0.2)),
        row("b1", "b", "b", (0.1, 0.7, 0.2)),
        row("c-wrong", "c", "a", (0.8, 0.15, 0.05)),
    ]
    groups = select_gallery(rows, classes, per_group=1)
    assert {g.key: [r.path.name for r in g.rows] for g in groups} == {
        "correct-a": ["a1"],
        "correct-b": ["b1"],
        "loss": ["c-wrong"],
    }
    assert rows[3].loss == pytest.approx(-math.log(0.05))
    text = caption(rows[3], classes, positive_class="c", threshold=0.5, loss=True)
    assert text == "true c, predicted a, p(a)=0.80, p(c)=0.05, loss 3.00"


def test_captions_state_truth_prediction_probability_and_threshold():
    fn = BINARY_ROWS[5]
    assert caption(fn, BINARY, positive_class="PNEUMONIA", threshold=0.41) == (
        "true PNEUMONIA, predicted NORMAL, p(PNEUMONIA)=0.02 (threshold 0.41)"
    )
    assert caption(fn, BINARY, positive_class="PNEUMONIA", threshold=0.41, loss=True).endswith(", loss 3.91")


def test_per_group_below_one_is_refused():
    with pytest.raises(ConfigError, match="got 0"):
        select_gallery(BINARY_ROWS, BINARY, per_group=0)


# ---------------------------------------------------------------------- files


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = TransferModel(net, spec)
    info = model_info(model, classes=BINARY, positive_class="PNEUMONIA", threshold=0.41, image_size=48, decode_size=56)
    run = tmp_path / "run"
    save_model(model, info, run)
    return run


def _write_predictions(run: Path, rows: list[tuple[str, str, str, float]], *, images: Path, split: str = "test") -> None:
    rng = np.random.default_rng(0)
    images.mkdir(parents=True, exist_ok=True)
    with (run / f"predictions_{split}.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id", "prob_NORMAL", "prob_PNEUMONIA", "pred"])
        for name, label, predicted, p in rows:
            path = images / f"{name}.png"
            Image.fromarray(rng.integers(0, 255, (70, 60), dtype=np.uint8), mode="L").save(path)
            writer.writerow([str(path), label, name, repr(1 - p), repr(p), predicted])


CSV_ROWS = [
    ("tp1", "PNEUMONIA", "PNEUMONIA", 0.97),
    ("tp2", "PNEUMONIA", "PNEUMONIA", 0.90),
    ("tp3", "PNEUMONIA", "PNEUMONIA", 0.60),
    ("fp1", "NORMAL", "PNEUMONIA", 0.85),
    ("fn1", "PNEUMONIA", "NORMAL", 0.12),
    ("tn1", "NORMAL", "NORMAL", 0.05),
    ("tn2", "NORMAL", "NORMAL", 0.20),
]


def test_write_gallery_writes_overlays_and_gallery_json(run_dir, tmp_path):
    _write_predictions(run_dir, CSV_ROWS, images=tmp_path / "images")
    (tmp_path / "images" / "tp1.png").unlink()  # a file that no longer exists is skipped
    stale = run_dir / "plots" / "gallery" / "old.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not a picture")

    path = write_gallery(run_dir, load_model(run_dir), per_group=2)

    assert path == run_dir / "gallery.json"
    gallery = json.loads(path.read_text())
    # resnet18's layer4 turns the 48 px input into a 2 x 2 map: the report says how coarse that is
    assert (gallery["target_layer"], gallery["map_cells"], gallery["input_size"]) == ("layer4", [2, 2], 48)
    titles = [s["title"] for s in gallery["sections"]]
    assert [t.split(":")[0] for t in titles] == ["True positives", "False positives", "False negatives", "True negatives", "Top losses"]
    assert all(t.endswith("(test split)") for t in titles)
    captions = {s["title"].split(":")[0]: [i["caption"] for i in s["items"]] for s in gallery["sections"]}
    assert captions["True positives"] == [
        "true PNEUMONIA, predicted PNEUMONIA, p(PNEUMONIA)=0.90 (threshold 0.41)",
        "true PNEUMONIA, predicted PNEUMONIA, p(PNEUMONIA)=0.60 (threshold 0.41)",
    ]
    assert captions["False negatives"] == ["true PNEUMONIA, predicted NORMAL, p(PNEUMONIA)=0.12 (threshold 0.41)"]
    assert captions["Top losses"] == [
        f"true PNEUMONIA, predicted NORMAL, p(PNEUMONIA)=0.12 (threshold 0.41), loss {-math.log(0.12):.2f}",
        f"true NORMAL, predicted PNEUMONIA, p(PNEUMONIA)=0.85 (threshold 0.41), loss {-math.log(0.15):.2f}",
    ]

    listed = [item["image"] for s in gallery["sections"] for item in s["items"]]
    assert all(image.startswith("plots/gallery/") and "tp1" not in image for image in listed)
    on_disk = sorted(p.relative_to(run_dir).as_posix() for p in (run_dir / "plots" / "gallery").iterdir())
    assert on_disk == sorted(listed)  # the stale PNG is gone, every listed image exists
    for image in listed:
        picture = Image.open(run_dir / image)
        assert picture.mode == "RGB" and picture.height > 48 and picture.width >= 48


def test_the_map_explains_the_predicted_class(run_dir, tmp_path, monkeypatch):
    """A false negative's map is the NORMAL map, as the CSV's prediction says, not the label's."""
    from medtransfer.explain import cam as cam_module

    _write_predictions(run_dir, [("fn1", "PNEUMONIA", "NORMAL", 0.12), ("tp1", "PNEUMONIA", "PNEUMONIA", 0.9)], images=tmp_path / "i")
    asked: list = []
    real_call = cam_module.ClassActivationMap.__call__

    def spy(self, images, *, class_index=None):
        asked.append(list(class_index))
        return real_call(self, images, class_index=class_index)

    monkeypatch.setattr(cam_module.ClassActivationMap, "__call__", spy)
    write_gallery(run_dir, load_model(run_dir), per_group=1)
    assert asked == [[1, 0]]  # tp1 (first group) -> PNEUMONIA (1), fn1 -> NORMAL (0); each image rendered once


def test_no_predictions_file_means_no_gallery(run_dir):
    assert write_gallery(run_dir, load_model(run_dir)) is None
    assert not (run_dir / "gallery.json").exists()


def test_other_split_and_bad_csv(run_dir, tmp_path):
    _write_predictions(run_dir, CSV_ROWS[:2], images=tmp_path / "images", split="val")
    path = write_gallery(run_dir, load_model(run_dir), per_group=1, split="val")
    assert json.loads(path.read_text())["sections"][0]["title"].endswith("(val split)")

    (run_dir / "predictions_test.csv").write_text("path,label,pred,prob_NORMAL\nx.png,NORMAL,NORMAL,0.9\n")
    with pytest.raises(DataError, match="missing column.*prob_PNEUMONIA"):
        write_gallery(run_dir, load_model(run_dir))
    with pytest.raises(ConfigError, match="--method"):
        write_gallery(run_dir, load_model(run_dir), method="lime")


def test_relative_paths_resolve_against_the_run_directory(run_dir, tmp_path):
    _write_predictions(run_dir, CSV_ROWS[:1], images=run_dir / "imgs")
    text = (run_dir / "predictions_test.csv").read_text().replace(str(run_dir / "imgs"), "imgs")
    (run_dir / "predictions_test.csv").write_text(text)
    rows = gallery_rows(run_dir, BINARY)
    assert rows[0].path == run_dir / "imgs" / "tp1.png"


def test_report_shows_the_gallery(run_dir, tmp_path):
    from medtransfer.evaluation.report import write_report

    _write_predictions(run_dir, CSV_ROWS, images=tmp_path / "images")
    write_gallery(run_dir, load_model(run_dir), per_group=1)
    cm = [[1, 1], [1, 1]]
    block = {"n": 4, "auc": 0.5, "accuracy": 0.5, "confusion_matrix": cm}
    (run_dir / "metrics.json").write_text(json.dumps({"positive_class": "PNEUMONIA", "threshold": 0.41, "val": block, "test": block}))
    html = write_report(run_dir).read_text()
    assert "p(PNEUMONIA)=0.12 (threshold 0.41)" in html
    assert "Grad-CAM on layer layer4: a 2 x 2 map of the 48 px input, one cell per 24 px" in html
    assert "Not shown" not in html


def test_layercam_gallery_reads_the_stride_16_stage_and_the_report_says_so(run_dir, tmp_path):
    from medtransfer.evaluation.report import write_report

    _write_predictions(run_dir, CSV_ROWS, images=tmp_path / "images")
    gallery = json.loads(write_gallery(run_dir, load_model(run_dir), per_group=1, method="layercam").read_text())
    # layer3 of resnet18: a 3 x 3 map of the 48 px input where layer4's is 2 x 2
    assert (gallery["method"], gallery["target_layer"], gallery["map_cells"]) == ("layercam", "layer3", [3, 3])
    assert all(item["image"].endswith("_layercam.png") for s in gallery["sections"] for item in s["items"])
    block = {"n": 4, "auc": 0.5, "accuracy": 0.5, "confusion_matrix": [[1, 1], [1, 1]]}
    (run_dir / "metrics.json").write_text(json.dumps({"positive_class": "PNEUMONIA", "threshold": 0.41, "val": block, "test": block}))
    assert "LayerCAM on layer layer3: a 3 x 3 map of the 48 px input, one cell per 16 px" in write_report(run_dir).read_text()


def test_lesion_masks_beside_the_data_are_outlined_on_the_gallery_images(run_dir, tmp_path):
    from medtransfer.explain.gallery import lesion_outline
    from medtransfer.explain.render import mask_edge

    data = tmp_path / "data"
    images = data / "test" / "PNEUMONIA"
    _write_predictions(run_dir, CSV_ROWS, images=images)
    mask = np.zeros((70, 60), np.uint8)
    mask[20:45, 10:30] = 255
    (data / "masks" / "test" / "PNEUMONIA").mkdir(parents=True)
    Image.fromarray(mask).save(data / "masks" / "test" / "PNEUMONIA" / "tp1.png")
    saved = load_model(run_dir)

    gallery = json.loads(write_gallery(run_dir, saved, per_group=1, data_root=data).read_text())

    outline = lesion_outline(saved, images / "tp1.png", data)
    assert outline.shape == (48, 48) and outline[25, 15] and not outline[5, 40]  # the mask, through the image's crop
    assert lesion_outline(saved, images / "tp2.png", data) is None and gallery["outlines"] == "lesion masks"
    first = gallery["sections"][0]["items"][0]["image"]
    assert first == "plots/gallery/tp_01_gradcam.png"  # named by section and rank, never by the image (privacy)
    picture = np.asarray(Image.open(run_dir / first))
    left = (picture.shape[1] - 48) // 2
    white = (picture[:48, left : left + 48] == 255).all(axis=2)
    assert (white == mask_edge(outline)).all()  # white exactly on the lesion's edge: jet never reaches white
