# Two commands set everything up on a fresh machine: `make build` and `make test` create .venv and install
# the project (with its test extra) on first use, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= resnet50v2
ARGS ?= --fp16

.PHONY: install build test test-slow bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

build: install
	$(VENV)/bin/exporter build $(MODEL) $(ARGS)

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) build *.egg-info
