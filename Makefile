# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# Both create (or reuse) the virtual environment in .venv/ first.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.flywheel-installed

.PHONY: run test bench clean-venv

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Flywheel needs Python 3.11+")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==26.3 setuptools==84.2.1 wheel==0.48.0
	$(PY) -m pip install --quiet -c requirements.lock -e '.[test,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/flywheel run

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m flywheel.bench.serving
	$(PY) -m flywheel.bench.wire

clean-venv:
	rm -rf $(VENV)
