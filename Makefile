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

# `make serve MODEL=/path/to/checkpoint` serves a real checkpoint; without it
# `tramontane serve` generates a demo checkpoint once into target/demo-model.
MODEL ?=
WORKERS ?= 2
LISTEN ?= 127.0.0.1:50051
HTTP_LISTEN ?= 127.0.0.1:8000
BENCH_MODEL := target/bench-model
# The models `make bench` and `make bench-sharded` run, as family:preset:
# Mixtral's bench, fine-grained experts as Qwen3-30B-A3B (128, top-8) and
# OLMoE-1B-7B (64, top-8) have them, and DeepSeek-V3's latent attention,
# grouped gate and shared expert (64, top-8), and gpt-oss's sinks, windows
# and biased, clamped experts (32, top-4), each about the same bytes.
# `make bench BENCH_MODELS=qwen3_moe:bench-fine` runs one.
BENCH_MODELS ?= mixtral:bench qwen3_moe:bench-fine olmoe:bench-fine deepseek_v3:bench gpt_oss:bench
comma := ,
# Writes each model of BENCH_MODELS once (mixtral:bench into BENCH_MODEL, the
# others into target/bench-FAMILY-PRESET) and runs $(1) with $$dir set to it.
define for_each_bench_model
	@set -e; for spec in $(BENCH_MODELS); do \
	  family=$${spec%%:*}; preset=$${spec#*:}; \
	  dir=$$( [ "$$spec" = mixtral:bench ] && echo $(BENCH_MODEL) || echo target/bench-$$family-$$preset ); \
	  test -f $$dir/config.json || $(BIN) gen-model --family $$family --preset $$preset --out $$dir >/dev/null; \
	  echo "== $$family $$preset ($$dir)"; \
	  $(1); \
	done
endef

.PHONY: setup build test lint serve gpu-check bench bench-rounds bench-prefix bench-structured bench-sharded bench-quality bench-routers bench-serving bench-plan bench-chaos test-tools

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

# What the tests run besides the project, from Debian's packages: Prometheus
# and promtool (the monitoring test); podman, runc and debootstrap (the image
# test builds and runs the CPU image).
TEST_COMMANDS = prometheus promtool podman runc debootstrap
TEST_PACKAGES = prometheus podman runc debootstrap
test-tools:
	@for c in $(TEST_COMMANDS); do command -v $$c >/dev/null || missing=1; done; [ -z "$$missing" ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(TEST_PACKAGES) >/dev/null; }

test: build lint test-tools
	cargo test --release --locked

serve: build
	$(BIN) serve --workers $(WORKERS) --listen $(LISTEN) --http-listen $(HTTP_LISTEN) --prometheus-targets deploy/prometheus/targets/local.json $(if $(MODEL),--model $(MODEL),)

# The CUDA path on cuda:0 (bf16 parity tests, serve with 2 workers, bench rows), one table; without CUDA it says so and exits 0.
gpu-check: build
	bash scripts/gpu_check.sh

# The in-process forward against transformers and llama.cpp (../shared/peers), f32, bf16 and int8 (against q8_0), on each of BENCH_MODELS (not part of `make test`).
bench: build
	$(call for_each_bench_model,$(PYTHON) benches/forward_vs_hf.py --model $$dir --bin $(BIN) --threads 2 --dtypes f32$(comma)bf16$(comma)int8)

# Decode in paired rounds (ours, then llama.cpp, ROUNDS times; the median of the rounds' ratios), int8 against q8_0 by default (BENCH_DTYPE), on each of BENCH_MODELS.
ROUNDS ?= 9
BENCH_DTYPE ?= int8
bench-rounds: build
	$(call for_each_bench_model,$(PYTHON) benches/paired_rounds.py --model $$dir --bin $(BIN) --threads 2 --dtype $(BENCH_DTYPE) --rounds $(ROUNDS))

# Prefix caching: 32 concurrent requests sharing a 1,024-token prefix (64-token suffixes), with the cache and without, on the bench model.
bench-prefix: build
	test -f $(BENCH_MODEL)/config.json || $(BIN) gen-model --preset bench --out $(BENCH_MODEL)
	$(PYTHON) benches/prefix_share.py --model $(BENCH_MODEL) --bin $(BIN) --threads 2 --workers 2

# Structured outputs' cost: decode steps of 32 concurrent requests under a JSON schema against the same unconstrained, alternating rounds, on the bench model.
bench-structured: build
	test -f $(BENCH_MODEL)/config.json || $(BIN) gen-model --preset bench --out $(BENCH_MODEL)
	$(PYTHON) benches/structured_cost.py --model $(BENCH_MODEL) --bin $(BIN) --threads 2 --workers 2 --rounds $(ROUNDS)

# Perplexity on a public-domain text (Genesis, KJV, from Debian's bible-kjv-text) unquantized and in int8, on each of BENCH_MODELS.
bench-quality: build
	bash scripts/public_domain_text.sh target/corpus/genesis.txt
	$(call for_each_bench_model,$(PYTHON) benches/perplexity.py --model $$dir --bin $(BIN) --text target/corpus/genesis.txt --threads 2)

# Sharded (router + 1/2/4 workers) against in-process, bf16, with the per-layer breakdown and bytes on the wire, on each of BENCH_MODELS.
bench-sharded: build
	$(call for_each_bench_model,$(PYTHON) benches/sharded_vs_local.py --model $$dir --bin $(BIN) --threads 2 --dtype bf16)

# Two routers sharing two workers (concurrency 32 each) against one router at 64.
bench-routers: build
	test -f $(BENCH_MODEL)/config.json || $(BIN) gen-model --preset bench --out $(BENCH_MODEL)
	$(PYTHON) benches/routers_shared.py --model $(BENCH_MODEL) --bin $(BIN) --threads 2 --concurrency 32

# The OpenAI API under load (serve --workers 2; concurrency 1, 8, 32) against the in-process batch-32 decode.
bench-serving: build
	test -f $(BENCH_MODEL)/config.json || $(BIN) gen-model --preset bench --out $(BENCH_MODEL)
	$(PYTHON) benches/serving_vs_local.py --model $(BENCH_MODEL) --bin $(BIN) --threads 2 --workers 2

# The planner against the real cluster: profile, then plan and measure 1/2/4
# workers at concurrency 1/8/32, and under skewed routing the planned
# placement against the default one.
bench-plan: build
	test -f $(BENCH_MODEL)/config.json || $(BIN) gen-model --preset bench --out $(BENCH_MODEL)
	test -f $(BENCH_MODEL)-skewed/config.json || $(BIN) gen-model --preset bench --expert-skew 1 --out $(BENCH_MODEL)-skewed
	$(PYTHON) benches/plan_vs_measured.py --bin $(BIN) --model $(BENCH_MODEL) --skewed-model $(BENCH_MODEL)-skewed --threads 2

# Faults under load, one serve --workers 2 each on the tiny checkpoint (generated once into
# target/chaos-model): kill -9 of a worker with and without replicas, SIGSTOP of a worker, 10x
# overload, malformed requests with an API key, floods; the expert pool changing (a rebalance, a
# worker added, removed, every worker restarted in turn, kill -9 under --self-heal); a PASS/FAIL
# table, non-zero exit on a FAIL. Then online rebalancing against plan's offline placement on the
# skewed bench checkpoint, 2 and 4 workers.
bench-chaos: build
	test -f target/chaos-model/config.json || $(BIN) gen-model --preset tiny --out target/chaos-model
	$(PYTHON) benches/chaos.py --bin $(BIN)
	test -f $(BENCH_MODEL)-skewed/config.json || $(BIN) gen-model --preset bench --expert-skew 1 --out $(BENCH_MODEL)-skewed
	$(PYTHON) benches/rebalance_vs_plan.py --bin $(BIN) --model $(BENCH_MODEL)-skewed --spare-slots 0 --rounds 2
