# The README's first two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install browser lint dist clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Torch is pinned to the release that lies on local disk: pip takes it offline in about a minute.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medtransfer demo --out demo-run

# The suite runs in TEST_WORKERS processes (pytest-xdist; each test file stays in one, so its
# trained fixtures are built once), each on one torch thread: cores are not oversubscribed.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
test: $(STAMP) browser lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# ruff (the rules in pyproject.toml) on everything, mypy on src/.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

# A wheel and an sdist, checked by twine, installed into a fresh venv that then runs the demo
# (the torch pin is this machine's local path; a user's pip resolves torch as usual). The slim
# core then refuses `serve` in one line naming the [serve] extra, and serves once the wheel's
# [serve] extra is in. build/ goes first: setuptools would pack a module left there from an
# earlier build; the demo folder too, or the demo finds its runs done and trains nothing.
DIST_VENV := /tmp/medtransfer-dist-venv
DIST_DEMO := /tmp/medtransfer-dist-demo
dist: $(STAMP)
	rm -rf dist build $(DIST_VENV) $(DIST_DEMO)
	$(BIN)/python -m build --no-isolation --sdist --wheel --outdir dist .
	$(BIN)/python -m twine check --strict dist/*
	$(PYTHON) -m venv $(DIST_VENV)
	$(DIST_VENV)/bin/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(DIST_VENV)/bin/pip install --quiet dist/*.whl
	cd /tmp && $(DIST_VENV)/bin/medtransfer demo --out $(DIST_DEMO) --epochs 1
	cd /tmp && { $(DIST_VENV)/bin/medtransfer serve --run $(DIST_DEMO)/finetune 2>$(DIST_DEMO)/serve.err; test $$? = 1; } \
		&& test "$$(cat $(DIST_DEMO)/serve.err)" = "error: medtransfer serve needs the [serve] extra: pip install 'medtransfer[serve]'"
	$(DIST_VENV)/bin/pip install --quiet "$$(ls dist/*.whl)[serve]"
	cd /tmp && $(DIST_VENV)/bin/medtransfer serve --help >/dev/null

# A test opens report.html in headless Chromium: install Debian's package when it is missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

# The documentation site (mkdocs.yml, docs/) into site/, offline; --strict: a broken link or reference fails.
.PHONY: docs
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) demo-run .pytest_cache dist build site
