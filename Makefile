# Two commands on a fresh machine (see README): `make demo` and `make test`.
# Both create or reuse .venv and install the pinned CPU torch build (constraints.txt).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.slimfx-installed
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

TP_VENV  ?= .venv-thirdparty
TP_BIN   := $(TP_VENV)/bin
TP_STAMP := $(TP_VENV)/.slimfx-installed
TP_PIP   := $(TP_BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints-thirdparty.txt

.PHONY: venv demo test lint bench clean venv-thirdparty test-thirdparty bench-thirdparty

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,hf]'
	touch $(STAMP)

# Real architectures (torchvision, timm, transformers) in their own environment: torch 2.14.1 + torchvision
# 0.29.1 (constraints-thirdparty.txt), so the main suite keeps torch 2.13.0 and slimfx is tested on both.
venv-thirdparty: $(TP_STAMP)

$(TP_STAMP): pyproject.toml constraints-thirdparty.txt
	test -x $(TP_BIN)/python || $(PYTHON) -m venv $(TP_VENV)
	$(TP_PIP) --upgrade pip
	$(TP_PIP) torch==2.14.1 torchvision==0.29.1
	$(TP_PIP) -e '.[dev,hf]' timm transformers
	touch $(TP_STAMP)

test-thirdparty: venv-thirdparty
	$(TP_BIN)/python -c "import torchvision, timm, transformers"  # a broken environment fails, never skips
	$(TP_BIN)/python -m pytest -n 2 --dist loadfile tests_thirdparty

bench-thirdparty: venv-thirdparty
	$(TP_BIN)/python benchmarks/bench_third_party.py

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
	rm -rf $(VENV) $(TP_VENV) slimfx-out .slimfx-test-cache .pytest_cache
