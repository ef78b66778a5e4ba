"""Bad input: one clear line on stderr naming the file or option and the fix, exit code 1, no traceback."""

from __future__ import annotations

import sys

import pytest
import torch

from medtransfer.cli import main

FAST = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--set", "cache_size=40",
        "--epochs", "1", "--bootstrap", "0", "--num-workers", "0", "--no-progress"]


def run(args: list, capsys) -> tuple[int, str]:
    saved = sys.argv
    sys.argv = ["medtransfer", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        sys.argv = saved
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def dataset(make_kaggle_tree):
    return make_kaggle_tree({"train": {"NORMAL": 4, "PNEUMONIA": 4}, "test": {"NORMAL": 2, "PNEUMONIA": 2}})


def test_missing_data_dir(tmp_path, capsys):
    code, err = run(["train", "--data", tmp_path / "nowhere", "--out", tmp_path / "run", *FAST], capsys)
    assert_one_line_error(code, err, "--data", "nowhere", "no such file or folder")


def test_split_with_no_images(make_kaggle_tree, tmp_path, capsys):
    root = make_kaggle_tree({"train": {"NORMAL": 3, "PNEUMONIA": 3}})
    (root / "test" / "NORMAL").mkdir(parents=True)
    code, err = run(["train", "--data", root, "--out", tmp_path / "run", *FAST], capsys)
    assert_one_line_error(code, err, str(root / "test" / "NORMAL"), "holds no images")


def test_class_sets_that_differ_between_splits(make_kaggle_tree, tmp_path, capsys):
    root = make_kaggle_tree({"train": {"NORMAL": 3, "PNEUMONIA": 3}, "test": {"NORMAL": 2, "COVID": 2}})
    code, err = run(["train", "--data", root, "--out", tmp_path / "run", *FAST], capsys)
    assert_one_line_error(code, err, "'test'", "COVID", "same class folders")


def test_corrupt_and_non_image_files_are_all_listed_before_training(dataset, tmp_path, capsys):
    broken = dataset / "train" / "NORMAL" / "IM-0900-0001.jpeg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    text = dataset / "train" / "PNEUMONIA" / "person900_virus_1.png"
    text.write_text("not an image")
    out = tmp_path / "run"
    code, err = run(["train", "--data", dataset, "--out", out, "--cache-dir", tmp_path / "cache", *FAST], capsys)
    assert_one_line_error(code, err, str(broken), str(text), "--skip-bad-images")
    assert not (out / "history.csv").exists()


def test_unknown_backbone_suggests_names(dataset, tmp_path, capsys):
    args = ["train", "--data", dataset, "--out", tmp_path / "run", *FAST, "--backbone", "resnet-18"]
    code, err = run(args, capsys)
    assert_one_line_error(code, err, "--backbone", "'resnet-18'", "Did you mean", "resnet18")


def test_weights_file_with_wrong_shapes(dataset, tmp_path, capsys):
    from medtransfer.models.backbones import create_backbone

    wrong, _ = create_backbone("resnet50", num_classes=2, weights="none")
    weights = tmp_path / "resnet50.pth"
    torch.save(wrong.state_dict(), weights)
    args = ["train", "--data", dataset, "--out", tmp_path / "run", *FAST, "--weights", weights]
    code, err = run(args, capsys)
    assert_one_line_error(code, err, f"--weights {weights}", "wrong shapes", "does not fit backbone resnet18")


def test_output_dir_that_is_not_a_run_is_left_alone(dataset, tmp_path, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("precious")
    code, err = run(["train", "--data", dataset, "--out", out, *FAST], capsys)
    assert_one_line_error(code, err, f"--out {out}", "not a medtransfer run", "new folder")
    assert (out / "chapter1.tex").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_output_dir_holding_a_run_points_to_resume(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("epochs: 1\n")
    code, err = run(["train", "--data", dataset, "--out", out, *FAST], capsys)
    assert_one_line_error(code, err, "already holds a run", f"--resume {out}")


@pytest.mark.parametrize(
    "option, value, fragments",
    [
        ("--threshold", "sensitivity:1.7", ["--threshold", "sensitivity:1.7"]),
        ("--val-fraction", "1.5", ["--val-fraction", "1.5"]),
        ("--strategy", "thaw", ["--strategy", "thaw", "finetune"]),
        ("--precision", "fp8", ["--precision", "fp8", "bf16-mixed"]),
        ("--threshold", "median", ["--threshold", "median", "youden"]),
        ("--accelerator", "tpu", ["--accelerator", "tpu", "cpu"]),
        ("--output-stride", "12", ["--output-stride", "12", "16"]),
        ("--output-stride", "16", ["output_stride", "16", "resnet18", "resnet50"]),  # BasicBlock takes no dilation
    ],
)
def test_bad_option_values(dataset, tmp_path, capsys, option, value, fragments):
    code, err = run(["train", "--data", dataset, "--out", tmp_path / "run", *FAST, option, value], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "run").exists()  # refused before the run folder was created


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--strategy", "linear-probe", "--set", "augment=false", "--set", "label_smoothing=0.1"],
         ["--label-smoothing: got 0.1", "linear probe on cached features", "remove the setting"]),
        (["--strategy", "finetune", "--freeze-children", "2"], ["--freeze-children: got 2", "only --strategy freeze"]),
        (["--set", "augment=false", "--hflip"], ["--horizontal-flip: got True", "augment is none"]),
    ],
)
def test_a_setting_the_chosen_path_ignores_is_refused(dataset, tmp_path, capsys, args, fragments):
    code, err = run(["train", "--data", dataset, "--out", tmp_path / "run", *FAST, *args], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--set", "lr"], ["--set 'lr'", "expected KEY=VALUE"]),
        (["--set", "learning_rate=0.1"], ["options: unknown setting 'learning_rate'"]),
        (["--out", None], ["--out: required"]),
        (["--data", None], ["--data: required"]),
        (["--resume", "RUN"], ["--resume: takes the run's own config.yaml", "leave out --config and --data"]),
    ],
)
def test_flag_errors(dataset, tmp_path, capsys, args, fragments):
    base = {"--data": dataset, "--out": tmp_path / "run"}
    extra = []
    for flag, value in zip(args[::2], args[1::2]):
        if flag in base and value is None:
            del base[flag]
        else:
            extra += [flag, tmp_path / "run" if value == "RUN" else value]
    code, err = run(["train", *[x for pair in base.items() for x in pair], *FAST, *extra], capsys)
    assert_one_line_error(code, err, *fragments)


def test_predict_with_a_folder_that_is_not_a_run(tmp_path, capsys, make_image):
    image = make_image(tmp_path / "x.png")
    code, err = run(["predict", "--run", tmp_path, image], capsys)
    assert_one_line_error(code, err, f"--run {tmp_path}", "no saved model found")


def test_config_file_with_unknown_key(dataset, tmp_path, capsys):
    config = tmp_path / "recipe.yaml"
    config.write_text("backbone: resnet18\nlearning_rate: 0.1\n")
    code, err = run(["train", "--data", dataset, "--out", tmp_path / "run", "--config", config], capsys)
    assert_one_line_error(code, err, str(config), "learning_rate")


def test_split_command_writes_a_patient_level_split(make_kaggle_tree, tmp_path, capsys):
    import csv

    root = make_kaggle_tree({"train": {"NORMAL": 20, "PNEUMONIA": 20}, "test": {"NORMAL": 3, "PNEUMONIA": 3}})
    out = tmp_path / "split.csv"
    code, _ = run(["split", "--data", root, "--out", out, "--val-fraction", "0.25"], capsys)
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 46 and {r["split"] for r in rows} == {"train", "val", "test"}
    assert sum(r["split"] == "val" for r in rows) == 10
    code, err = run(["split", "--data", root, "--out", tmp_path], capsys)
    assert_one_line_error(code, err, f"--out {tmp_path}", "is a folder")


def test_cache_command_uses_the_training_cache_size_by_default(dataset, tmp_path, capsys):
    from medtransfer.config import TrainConfig
    from medtransfer.data.cache import CacheSettings, ImageCache

    code, _ = run(["cache", "--data", dataset, "--cache-dir", tmp_path / "cache", "--workers", "1"], capsys)
    assert code == 0
    images = ImageCache(tmp_path / "cache", CacheSettings(size=TrainConfig().cache_size)).build(
        sorted(dataset.rglob("*.jpeg")), workers=1
    )
    assert len(images) == 12 and images.built == 0  # all found in the cache at the default size
