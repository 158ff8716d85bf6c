# Two commands (README): `make demo` sets everything up and runs the main job;
# `make test` sets everything up and runs the test suite. Both are idempotent.
# `make test-long` runs the long tests `make test` leaves out: the multi-process launches, every
# recipe's smoke run, the README followed, and the tests under a real single-node SLURM (root;
# CI runs both targets).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# slurm-wlm and munge: the single-node SLURM that `make test-long` starts and stops
APT_PACKAGES := dataset-fashion-mnist pkg-config libturbojpeg0-dev libopencv-dev slurm-wlm munge
DEMO_RECIPES := recipes/fashion_mnist/resnet_baseline.yaml recipes/fashion_mnist/resnet_pgt.yaml

.PHONY: setup demo test test-long check bench results clean

setup: $(VENV)/.installed

# Debian packages: installed once, skipped when dpkg already has them all; checked again when
# the Makefile (its package list) changes. Order-only below: a new package rebuilds no venv.
.apt-installed: Makefile
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); }
	@touch $@

# The venv is rebuilt only when the package's requirements change.
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt | .apt-installed
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[ffcv,dali,test]'
	@touch $@

# Everything a user's target writes goes under runs/ (git ignores it): the demo's table lands
# beside its runs, runs/fashion_mnist/fashion_mnist_demo.md.
demo: setup
	$(VENV)/bin/powergrad train $(DEMO_RECIPES) --compare fashion_mnist_demo

check: setup
	$(VENV)/bin/powergrad check

# One pytest run over 2 workers: most slow tests wait on subprocesses (torchrun, SLURM-style
# tasks, signals) or use one torch thread (tests/conftest.py), so two at a time share the 2
# cores. Its pytest took 3 min 57 s here for 848 tests (2 cores shared with other work,
# 2026-12-08). The long tests run apart (test-long): with them the run took over 20 minutes.
LONG := cluster or recipe_smoke or readme
test: setup
	$(VENV)/bin/powergrad check
	$(PY) -m pytest -q -p xdist -n 2 -m "not slurm and not ($(LONG))"

# Launches of several processes (torchrun, srun-style tasks, gpu-check's engine rows; marker
# cluster), every shipped recipe for two steps (recipe_smoke) and the README followed in a
# fresh copy (readme) over 2 workers, then the README's SLURM job scripts and the study's job
# array under a real slurmctld, slurmd and munged that the tests start as root and stop
# (marker slurm; one job at a time, so one pytest process).
test-long: setup
	$(PY) -m pytest -q -p xdist -n 2 -m "($(LONG)) and not slurm"
	$(PY) -m pytest -q -m slurm

# A benchmark writes its JSON record beside its table (runs/bench/bench_pgt.json) and renders
# the table from it; `--render RECORD --write TABLE` redraws a table without measuring.
bench: setup
	$(PY) tools/bench_pgt.py --write runs/bench/bench_pgt.md

# For maintainers: refresh the tracked tables in results/ (the demo's runs are reused when
# already trained). Each file records the command that made it; each benchmark table is
# rendered from the JSON record beside it (results/bench_*.json), and what is written by hand
# below a table's generated part stays.
results: setup
	$(VENV)/bin/powergrad train $(DEMO_RECIPES) --compare results/fashion_mnist_demo
	$(PY) tools/bench_pgt.py --threads 1 --write results/bench_pgt.md
	$(PY) tools/bench_loader.py --images 1280 --repeats 3 --write results/bench_loader.md
	$(PY) tools/bench_engine.py --write results/bench_engine.md
	$(PY) tools/bench_check_data.py --images 2000 --write results/bench_check_data.md

clean:
	rm -rf $(VENV) .apt-installed runs
