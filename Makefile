# The two commands of the README. Each makes .venv and installs what it needs.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo lint bench chaos clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON): apt-get install python3.11 python3.11-venv"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@bash tests/support/install-servers.sh
	@touch $(STAMP)

# The fault tests (tests/fault) append one JSON line each to RESULTS; the table printed at
# the end fails the run when a crash point of the catalog was never hit.
RESULTS      := $(CURDIR)/.fault-results.jsonl
CHAOS_TESTS  ?= tests/fault

test: $(STAMP)
	$(VENV)/bin/ruff check syncengine tests benchmarks
	$(VENV)/bin/mypy
	@rm -f $(RESULTS)
	SYNCENGINE_FAULT_RESULTS=$(RESULTS) $(PY) -m pytest -q; status=$$?; \
	  $(PY) tests/fault/table.py --require-all-points $(RESULTS) || status=1; exit $$status

# The fault suite at its release figures (RELIABILITY.md "long"): hours, not minutes.
# CHAOS_TESTS=tests/fault/test_t05_hub_crash.py make chaos runs one test; SYNCENGINE_SEED
# replays a run.
chaos: $(STAMP)
	@rm -f $(CURDIR)/chaos-results.jsonl
	SYNCENGINE_FAULT_RESULTS=$(CURDIR)/chaos-results.jsonl $(PY) -m pytest -q --long $(CHAOS_TESTS); status=$$?; \
	  $(PY) tests/fault/table.py \
	  $(if $(filter tests/fault,$(CHAOS_TESTS)),--require-all-points) $(CURDIR)/chaos-results.jsonl || status=1; exit $$status

demo: $(STAMP)
	$(VENV)/bin/syncengine demo

lint: $(STAMP)
	$(VENV)/bin/ruff check syncengine tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/edge_write.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
