# memos front door. Every target installs what it needs into .venv first.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
SRC    := $(wildcard memos tests bench clients scripts)

.PHONY: install run test lint bench faults soak format clean

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
	$(VENV)/bin/memos serve

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check $(SRC)
	$(VENV)/bin/ruff format --check $(SRC)
	$(VENV)/bin/mypy memos bench
	$(VENV)/bin/mypy --strict clients/python/memos_client
	$(PY) scripts/audit_deps.py

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
	$(PY) -m bench.reembed
	$(PY) -m bench.scheduler

# Fault injection alone (kill -9 mid-ingest, Postgres stopped under load); make test runs these too.
faults: install
	$(PY) -m pytest -m faults -v -s -rA

# Mixed traffic from many clients against a real service, then every acknowledged write checked.
# SOAK_ARGS="--clients 50 --seconds 60" (the defaults); figures go to docs/benchmarks.md by hand.
soak: install
	$(PY) -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
