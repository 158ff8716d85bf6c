# Two commands (README): `make demo` sets everything up and runs the main job;
# `make test` sets everything up and runs the test suite. Both are idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := dataset-fashion-mnist pkg-config libturbojpeg0-dev libopencv-dev
DEMO_RECIPES := recipes/fashion_mnist/resnet_baseline.yaml recipes/fashion_mnist/resnet_pgt.yaml

.PHONY: setup demo test check bench clean

setup: $(VENV)/.installed

# Debian packages: installed once, skipped when dpkg already has them all.
.apt-installed:
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); }
	@touch $@

# The venv is rebuilt only when the package's requirements change.
$(VENV)/.installed: .apt-installed setup.cfg pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[ffcv,test]'
	@touch $@

demo: setup
	$(VENV)/bin/powergrad train $(DEMO_RECIPES) --compare fashion_mnist_demo

check: setup
	$(VENV)/bin/powergrad check

# The recipe smoke tests use one torch thread each, so two processes share the 2 cores.
test: setup
	$(VENV)/bin/powergrad check
	$(PY) -m pytest -q -m "not recipe_smoke"
	$(PY) -m pytest -q -p xdist -n 2 -m recipe_smoke

bench: setup
	$(PY) tools/bench_pgt.py

clean:
	rm -rf $(VENV) .apt-installed runs
