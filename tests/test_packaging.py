"""The package installs as users install it: a wheel and an sdist that twine accepts, a slim core,
and a one-line message naming the extra when a command needs one that is missing."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from medtransfer.errors import MissingExtraError, missing_extra
from tests.e2e.test_train_predict import invoke

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True)
    return out


def test_wheel_and_sdist_pass_twine_check(dist):
    files = sorted(dist.iterdir())
    assert {f.suffix for f in files} == {".whl", ".gz"}
    result = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, files)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_wheel_carries_the_typed_marker_and_the_published_tables(dist):
    wheel = next(dist.glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("medtransfer/py.typed", "medtransfer/evaluation/published_results.json",
                   "medtransfer/evaluation/published_chestxray14.json", "medtransfer/cli/__main__.py"):
        assert needed in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    for extra in ("serve", "dicom", "onnx", "tracking", "docs", "all"):
        assert f"Provides-Extra: {extra}" in metadata
    core = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not any(name in " ".join(core) for name in ("fastapi", "onnxruntime", "pydicom", "mlflow"))


def test_a_missing_extra_is_named_with_its_install_line():
    error = missing_extra("medtransfer serve", "serve")
    assert isinstance(error, MissingExtraError)
    assert str(error) == "medtransfer serve needs the [serve] extra: pip install 'medtransfer[serve]'"


def test_serve_without_the_serve_extra_says_which_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    code = invoke(["serve", "--run", tmp_path])
    assert code == 1
    assert "medtransfer serve needs the [serve] extra: pip install 'medtransfer[serve]'" in capsys.readouterr().err


def test_export_without_the_onnx_extra_says_which_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code = invoke(["export", "--run", tmp_path])
    assert code == 1
    assert "pip install 'medtransfer[onnx]'" in capsys.readouterr().err


def test_a_logger_without_the_tracking_extra_says_which_extra(monkeypatch):
    from medtransfer.train import tracking

    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingExtraError, match=r"^--logger mlflow needs the \[tracking\] extra: "
                                                 r"pip install 'medtransfer\[tracking\]', or use --logger csv$"):
        tracking.check_logger("mlflow")


def test_a_dataframe_without_the_notebook_extra_says_which_extra(monkeypatch):
    from medtransfer.api.inputs import require_pandas

    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"^Model.predict needs the \[notebook\] extra: pip install 'medtransfer\[notebook\]'"):
        require_pandas("Model.predict")


def test_the_sdist_carries_the_whole_test_suite_and_no_build_output(dist):
    import tarfile

    names = {name.split("/", 1)[1] for name in tarfile.open(next(dist.glob("*.tar.gz"))).getnames() if "/" in name}
    for needed in ("tests/conftest.py", "tests/e2e/test_train_predict.py", "tests/fixtures/model_json_v1.json",
                   "configs/chest_xray_pneumonia.yaml", "docs/index.md", "mkdocs.yml", "Makefile", "CHANGELOG.md"):
        assert needed in names
    assert not any(name.startswith("build/") or "__pycache__" in name or name.endswith(".pyc") for name in names)
