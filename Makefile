VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# `make run` needs only what serving needs; `make test`/`lint` add the dev extras.
RUNTIME := $(VENV)/.installed-runtime
DEV := $(VENV)/.installed-dev
# pytest-xdist workers: on 2 cores 3 beat 4 (and 2) now that the suite hardly waits (docs/testing.md)
TEST_WORKERS ?= 3

.PHONY: run test check lint bench clean

$(RUNTIME): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $(RUNTIME)

$(DEV): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	touch $(RUNTIME) $(DEV)

run: $(RUNTIME)
	$(VENV)/bin/jobledger serve --db ./jobledger.db --host 127.0.0.1 --port 8080

lint: $(DEV)
	$(VENV)/bin/ruff check ledger projections api tests bench
	$(VENV)/bin/ruff format --check ledger projections api tests bench
	$(VENV)/bin/mypy

# `check` = lint + tests, what CI runs; `test` is the same (kept for the README's two commands).
check: test

test: lint
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist worksteal

bench: $(DEV)
	$(PIP) install -q -e '.[dev,bench]'
	@command -v wrk >/dev/null || echo "wrk is not installed: the benchmark uses its aiohttp \
	load generator instead (slower). To measure with wrk, install it first, e.g. apt-get install wrk"
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
