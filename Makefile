# memos front door. Every target installs what it needs into .venv first.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
SRC    := $(wildcard memos tests migrations bench clients)

.PHONY: install run test lint bench format clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Reinstall when the dependency pins change.
$(STAMP): $(PY) pyproject.toml constraints.txt clients/python/pyproject.toml
	$(PIP) install --quiet -c constraints.txt -e ".[dev]" -e clients/python
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/memos serve --host 127.0.0.1 --port 8000

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check $(SRC)
	$(VENV)/bin/ruff format --check $(SRC)
	$(VENV)/bin/mypy memos
	$(VENV)/bin/mypy --strict clients/python/memos_client

format: install
	$(VENV)/bin/ruff format $(SRC)
	$(VENV)/bin/ruff check --fix $(SRC)

# Figures go to stdout and bench/results/*.json; docs/benchmarks.md records them with machine and date.
bench: install
	$(PY) -m bench.api_latency
	$(PY) -m bench.locomo
	$(PY) -m bench.search_scale
	$(PY) -m bench.semcache
	$(PY) -m bench.kv_ttft

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
