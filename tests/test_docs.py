"""The documentation site (mkdocs.yml, docs/) builds with --strict and says only what the project holds.

- `mkdocs build --strict` passes: every link resolves to a page and every anchor to a heading, the
  API reference's objects exist (mkdocstrings), and the changelog snippet is found;
- every page under docs/ is in the nav;
- no page refers to a path outside the project (a sibling checkout, the machine's folders, a home
  directory), in the Markdown or in the built HTML (which includes the rendered docstrings);
- every `medtransfer COMMAND` the pages name in code exists in `medtransfer --help`, and every
  `--option` on such a line is one of that command's options.

The docs packages come with the test extra (pyproject.toml), so the build runs here, never skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIG = ROOT / "mkdocs.yml"
SNIPPETS = [ROOT / "CHANGELOG.md"]  # included by docs/changelog.md (pymdownx.snippets)
HELPERS = DOCS / "_ext"  # the build's griffe extension, excluded from the site (exclude_docs)

# Paths that exist on one machine only: a sibling folder of the checkout, the machine's work folder,
# home directories.
OUTSIDE = re.compile(r"\.\./shared|/work/|/home/|/Users/|/root/|[A-Za-z]:\\Users\\")

FENCE = re.compile(r"^(`{3,}|~{3,})[^\n]*\n(.*?)^\1[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
# `medtransfer COMMAND` at the start of a command: after a line start, a space, a path or a quote.
COMMAND = re.compile(r"(?:^|(?<=[\s/(\"'`]))medtransfer[ \t]+([a-z][a-z0-9-]*)")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if HELPERS not in p.parents)


def nav_files(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in nav_files(value)]
    return []


def code_of(text: str) -> list[str]:
    """Code from fenced blocks (continuation lines joined, comments dropped) and inline code spans."""
    chunks = []
    for block in FENCE.finditer(text):
        for line in block.group(2).replace("\\\n", " ").splitlines():
            chunks.append(line.split(" #", 1)[0])
    prose = FENCE.sub("", text)
    chunks += CODE_SPAN.findall(prose)
    return chunks


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(CONFIG), "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    assert "WARNING" not in log, log
    return out


def test_site_builds_strict_with_every_page(site: Path):
    for page in pages():
        rel = page.relative_to(DOCS).with_suffix("")
        html = site / ("index.html" if rel.name == "index" else rel / "index.html")
        assert html.is_file(), f"{page.relative_to(ROOT)} was not built ({html.relative_to(site)} missing)"
    assert not (site / "_ext").exists(), "the build helper must stay out of the site"
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("train", "load", "TrainedRun", "Model", "Evaluation", "Explanation", "Recalibration"):
        assert f'id="medtransfer.api.{name}"' in api, f"the API reference lacks medtransfer.api.{name}"
    assert "TrainConfig" in api and "image_size" in api, "the API reference lacks the settings (TrainConfig)"


class _ConfigLoader(yaml.SafeLoader):
    """mkdocs.yml with MkDocs' own tags (``!relative``, ``!ENV``) read as plain values."""


_ConfigLoader.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node)
                                    if isinstance(node, yaml.ScalarNode) else None)


def test_every_page_is_in_the_nav():
    nav = yaml.load(CONFIG.read_text(encoding="utf-8"), Loader=_ConfigLoader)["nav"]
    listed = set(nav_files(nav))
    missing = sorted(str(p.relative_to(DOCS)) for p in pages() if str(p.relative_to(DOCS)) not in listed)
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"
    assert "ARCHITECTURE.md" in listed


def test_no_page_refers_to_paths_outside_the_project():
    sources = [*pages(), CONFIG, *SNIPPETS]
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in sources
             for m in OUTSIDE.finditer(p.read_text(encoding="utf-8"))]
    assert not found, "paths outside the project:\n" + "\n".join(found)


def test_built_pages_refer_to_no_paths_outside_the_project(site: Path):
    """The HTML adds what the Markdown does not show: the docstrings mkdocstrings renders."""
    built = [p for p in site.rglob("*.html") if "assets" not in p.relative_to(site).parts]
    found = [f"site/{p.relative_to(site)}: {m.group(0)}" for p in built
             for m in OUTSIDE.finditer(p.read_text(encoding="utf-8"))]
    assert not found, "paths outside the project:\n" + "\n".join(found)


@pytest.fixture(scope="module")
def cli_commands() -> set[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    result = subprocess.run([sys.executable, "-m", "medtransfer.cli", "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    listing = result.stdout.split("Commands", 1)[1]
    commands = set(re.findall(r"^[\s│|]*([a-z][a-z0-9-]*)\s{2,}\S", listing, flags=re.MULTILINE))
    assert {"train", "predict", "evaluate", "serve"} <= commands, result.stdout
    return commands


def documented_commands() -> list[tuple[str, str, str]]:
    """(page, command, code line) for each `medtransfer COMMAND` in code on the pages and the changelog."""
    found = []
    for page in [*pages(), *SNIPPETS]:
        for chunk in code_of(page.read_text(encoding="utf-8")):
            for match in COMMAND.finditer(chunk):
                found.append((str(page.relative_to(ROOT)), match.group(1), chunk[match.start():]))
    return found


def test_every_documented_command_exists(cli_commands: set[str]):
    found = documented_commands()
    assert len({command for _, command, _ in found}) >= 10, "the parser found too few commands: check the regexes"
    unknown = sorted({f"{page}: medtransfer {command}" for page, command, _ in found if command not in cli_commands})
    assert not unknown, f"commands not in `medtransfer --help` ({', '.join(sorted(cli_commands))}):\n" + "\n".join(unknown)


def test_every_documented_option_exists(cli_commands: set[str]):
    import typer.main

    from medtransfer.cli import app

    group = typer.main.get_command(app)
    options = {
        name: {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--help"}
        for name, command in group.commands.items()
    }
    wrong = []
    for page, command, line in documented_commands():
        if command not in options:
            continue  # reported by test_every_documented_command_exists
        for option in OPTION.findall(re.split(r"\s[|;&]\s|\s&&\s", line)[0]):
            if option not in options[command]:
                wrong.append(f"{page}: medtransfer {command} {option}")
    assert not wrong, "options not in `medtransfer COMMAND --help`:\n" + "\n".join(sorted(set(wrong)))
