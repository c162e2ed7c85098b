VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# pytest-xdist workers: the suite mostly waits (processes, fsyncs), so 4 beat 2 even on 2 cores
TEST_WORKERS ?= 4

.PHONY: run test check lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/jobledger serve --db ./jobledger.db --host 127.0.0.1 --port 8080

lint: $(STAMP)
	$(VENV)/bin/ruff check ledger projections api tests bench
	$(VENV)/bin/ruff format --check ledger projections api tests bench
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist worksteal

bench: $(STAMP)
	$(PIP) install -q -e '.[dev,bench]'
	command -v wrk >/dev/null || apt-get install -y -q wrk >/dev/null 2>&1 || \
		echo "wrk is not installed: the benchmark falls back to its aiohttp load generator"
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
