# The README's two commands: `make demo` (set up + build the bundled demo) and `make test` (set up + run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

# torch is installed first and pinned: other packages would otherwise pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,all]'
	touch $@

demo: setup
	$(VENV)/bin/lorafast-export build --force

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check lorafast_export tests bench scripts

clean:
	rm -rf dist .pytest_cache
