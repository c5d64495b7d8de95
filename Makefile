# The README's two commands: `make demo` (set up + build the bundled demo) and `make test` (set up + run the tests).
# CI (.ci/run) runs `make lint test test-lowest`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
LOWEST ?= .venv-lowest

.PHONY: setup demo test test-lowest lint bench clean

# pip from the registry, tried up to 3 times 20 s apart: a download cut off mid-file (CI once lost torch 2.11's wheel at
# 452 of 530 MB, its resumes refused) is retried whole rather than failing the job.
RETRY := sh -c 'for try in 1 2 3; do "$$@" && exit 0; test $$try -lt 3 || exit 1; echo "retrying in 20 s: $$*" >&2; sleep 20; done' retry

setup: $(VENV)/.installed

# The exact tested set (constraints.txt). torch is installed first: other packages would otherwise pull a
# multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(RETRY) $(PIP) install -q --upgrade pip
	$(RETRY) $(PIP) install -q --resume-retries 5 -c constraints.txt torch
	$(RETRY) $(PIP) install -q --resume-retries 5 -c constraints.txt -e '.[dev,all]'
	touch $@

demo: setup
	$(VENV)/bin/lorafast-export build --force

test: setup
	$(PY) -m pytest

# The lowest supported versions (pyproject's lower bounds, constraints-lowest.txt) in a second venv, without the
# optional runtimes (their targets' tests skip), then the suite.
$(LOWEST)/.installed: pyproject.toml constraints-lowest.txt
	test -x $(LOWEST)/bin/python || python3 -m venv $(LOWEST)
	$(RETRY) $(LOWEST)/bin/pip install -q --upgrade pip
	$(RETRY) $(LOWEST)/bin/pip install -q --resume-retries 5 -c constraints-lowest.txt torch
	$(RETRY) $(LOWEST)/bin/pip install -q --resume-retries 5 -c constraints-lowest.txt -e '.[dev]'
	touch $@

test-lowest: $(LOWEST)/.installed
	$(LOWEST)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff format --check lorafast_export tests bench scripts
	$(VENV)/bin/ruff check lorafast_export tests bench scripts

clean:
	rm -rf dist .pytest_cache
