# Tramontane: `make serve` runs the main job, `make test` runs every test.
# Both set up what is missing first: a Python virtualenv in .venv with the
# pinned requirements (torch provides libtorch for tch), then the Rust build.

SHELL := /bin/bash
VENV := $(CURDIR)/.venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
BIN := target/release/tramontane

# torch-sys finds libtorch through the active Python (LIBTORCH_USE_PYTORCH).
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1

# `make serve MODEL=/path/to/checkpoint` serves a real checkpoint; without it a
# demo checkpoint is generated once into target/demo-model.
MODEL ?=
DEMO_MODEL := target/demo-model
PROMPT ?= The tramontane is a cold wind that
MAX_TOKENS ?= 32
BENCH_MODEL := target/bench-model

.PHONY: setup build test lint serve bench

setup: $(STAMP)

$(STAMP): requirements.txt
	@command -v python3 >/dev/null || { echo "python3 is required to create .venv" >&2; exit 1; }
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

build: setup
	cargo build --release --locked

lint: setup
	cargo fmt --all --check
	cargo clippy --release --locked --all-targets -- -D warnings

test: build lint
	cargo test --release --locked

$(DEMO_MODEL)/config.json: | build
	$(BIN) gen-model --preset tiny --out $(DEMO_MODEL)

serve: build $(if $(MODEL),,$(DEMO_MODEL)/config.json)
	$(BIN) generate --model $(if $(MODEL),$(MODEL),$(DEMO_MODEL)) --prompt "$(PROMPT)" --max-tokens $(MAX_TOKENS)

# The in-process forward against transformers on the bench preset (not part of `make test`).
bench: build
	test -f $(BENCH_MODEL)/config.json || $(BIN) gen-model --preset bench --out $(BENCH_MODEL)
	$(PYTHON) benches/forward_vs_hf.py --model $(BENCH_MODEL) --bin $(BIN) --threads 2
