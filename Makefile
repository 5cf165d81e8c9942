# Two entry points for a fresh machine:
#   make demo   set up .venv, then run the main job on the built-in `shapes` data
#   make test   set up .venv, then run the test suite
#   make lint   set up .venv, then run the linter (ruff, configured in pyproject.toml)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,export]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/maskrcnn demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
