# Two commands on a fresh machine (see README): `make demo` and `make test`.
# Both create or reuse .venv and install the pinned CPU torch build (constraints.txt).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.slimfx-installed
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,hf]'
	touch $(STAMP)

demo: venv
	$(BIN)/slimfx compile

test: venv
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(PIP) -e '.[dev,hf,bench]'
	@for b in benchmarks/bench_*.py benchmarks/distill_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) slimfx-out .slimfx-test-cache .pytest_cache
