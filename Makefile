# One-command workflows: `make install`, `make run`, `make test`. See README.md.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= aliases.yaml
HOST   ?= 127.0.0.1
PORT   ?= 3025

.PHONY: install bench-deps run test lint format demo bench bench-workers bench-gpu chaos check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# tests/node brings its own Node (openai 7 needs >= 22) from the registry; npm runs on whatever Node there is,
# so its engine warnings are noise. Without npm and node, tests/test_node_sdk*.py skip.
install: $(BIN)/python  ## venv + editable install with test extras, and the Node clients the tests drive
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@if command -v npm >/dev/null; then npm ci --prefix tests/node --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the Node openai SDK tests will be skipped"; fi

# The fake upstream of demo, bench and chaos needs the `bench` extra (aiohttp-sse; py-spy for bench's profile),
# which `make install` leaves out: installed here on first use.
bench-deps: $(BIN)/python
	@$(BIN)/python -c 'import aiohttp_sse' 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[bench]'

run:  ## serve the shipped aliases.yaml on $(HOST):$(PORT)
	$(BIN)/manaproxy serve --config $(CONFIG) --host $(HOST) --port $(PORT)

check:  ## validate $(CONFIG) without serving
	$(BIN)/manaproxy check --config $(CONFIG)

# Two pytest workers, one test file each at a time (a module's shared fixtures — one browser, one redis-server —
# stay in one worker): most tests wait on sockets and timers, so two at once take about 2/3 of the time.
test:  ## the whole suite
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint:  ## ruff (lint + format check) and mypy --strict (manaproxy and bench, setup.cfg [mypy])
	$(BIN)/ruff check manaproxy tests bench
	$(BIN)/ruff format --check manaproxy tests bench
	$(BIN)/mypy

format:
	$(BIN)/ruff check --fix manaproxy tests bench
	$(BIN)/ruff format manaproxy tests bench

demo: bench-deps  ## a fake upstream + manaproxy in front of it, and a streamed answer through curl
	bash docs/demo.sh

bench: bench-deps  ## throughput and latency: manaproxy vs direct (and LiteLLM when installed); BENCH_ARGS=--with-litellm
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-workers: bench-deps  ## server.workers 1 against auto (and bare): throughput, CPU per request and per event (≈2 min)
	$(BIN)/python bench/workers.py $(WORKERS_ARGS)

bench-gpu: bench-deps  ## learned concurrency: a fake busy GPU before a cloud; no limit vs max_concurrent: K vs auto (≈6 min; GPU_ARGS)
	$(BIN)/python bench/gpu.py $(GPU_ARGS)

chaos: bench-deps  ## fault-injecting load through manaproxy, bounded; exits 1 on a silent truncation or a 500 (docs/chaos.md)
	$(BIN)/python bench/chaos.py $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
