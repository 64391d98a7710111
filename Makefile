# The two commands of the README. Each makes .venv and installs what it needs.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo lint bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON): apt-get install python3.11 python3.11-venv"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@bash tests/support/install-servers.sh
	@touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check syncengine tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/syncengine demo

lint: $(STAMP)
	$(VENV)/bin/ruff check syncengine tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/edge_write.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
