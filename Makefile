# The two commands of the README: `make demo` and `make test`. Both create or refresh .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.gspn-installed
# Exact versions (constraints.txt); torch first, so that the CPU build on disk is the one taken.
PIN    := -c constraints.txt
export HYPOTHESIS_PROFILE ?= ci
# Test workers (pytest-xdist): auto = one per CPU this process may use, none on one CPU (see
# tests/conftest.py); `make test TEST_WORKERS=0` runs in one process, as without xdist.
TEST_WORKERS ?= auto

.PHONY: setup ortops demo test bench clean

setup: $(STAMP) ortops

# The ONNX Runtime custom-operator library, built from source (headers fetched into build/).
ortops: $(STAMP)
	bash scripts/fetch_ort_headers.sh
	$(PY) -m export.build

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIN) torch
	$(PY) -m pip install --quiet $(PIN) -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/gspn demo --out out

# loadgroup: tests that share a module's fixtures stay on one worker; no reorder: the slowest go first.
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder tests

# Passive OpenMP waits: torch's idle threads would otherwise spin against TVM's and ONNX Runtime's.
bench: setup
	OMP_WAIT_POLICY=passive $(VENV)/bin/gspn bench --json out/bench.json

clean:
	rm -rf out build .pytest_cache .hypothesis
