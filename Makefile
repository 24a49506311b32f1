# medmoco: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch 2.13.0 is on local disk on our machines; installing it first
# keeps pip from pulling a multi-GB CUDA build for the `torch>=2.4` requirement.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e .[dev]
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m pipelines.demo --workdir demo-run

test: venv
	$(PY) -m pytest -q -ra tests

bench: venv
	$(PY) benchmarks/preprocess.py

clean:
	rm -rf demo-run .pytest_cache
