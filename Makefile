# prefcore — the two commands: `make demo` and `make test`.
# Each sets up what it needs: a .venv, torch (CPU build from local disk), the native build.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
CSRC := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.inc' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null)
DEPS_STAMP := $(VENV)/.prefcore-deps
EXT_STAMP := prefcore/.ext-built

.PHONY: demo demo-quick test build cuda-check gpu-check bench bench-smoke bench-table clean help

help:
	@echo "make demo        set up .venv and the build, then run the whole pipeline over seeds 0,1,2 (prefcore demo, <= 3 min on 2 cores)"
	@echo "make test        set up .venv, build prefcore._C, compile-check CUDA sources, run pytest"
	@echo "make build       (re)build the native extension in place (incremental)"
	@echo "make cuda-check  nvcc -c every csrc/cuda/*.cu against torch's headers (no link)"
	@echo "make gpu-check   on a GPU machine: build the CUDA extension, run the CUDA tests, bench, 2 bf16 policy steps"
	@echo "make bench       time every op in ordinary processes; writes bench/results/<machine>-<date>.json"
	@echo "make bench-smoke run bench/test_bench.py once at tiny sizes (part of make test)"
	@echo "make bench-table regenerate README.md's benchmark table from bench/results/*.json"

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (from the local CPU wheel) unless a torch>=2.4 is already importable, then the
# package and its test extra without build isolation (isolation would fetch another torch).
$(DEPS_STAMP): $(PY) pyproject.toml setup.py
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja packaging
	$(PY) -c 'import sys, torch; from packaging.version import Version as V; sys.exit(V(torch.__version__.split("+")[0]) < V("2.4"))' 2>/dev/null \
		|| $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $@ $(EXT_STAMP)

# Incremental rebuild (ninja) whenever a C++/CUDA source changes. On a fresh machine the editable
# install above has just built prefcore._C: make could not know that (the stamp did not exist when
# it planned), so skip a second full compile when the stamp is newer than every source.
$(EXT_STAMP): $(DEPS_STAMP) $(CSRC) setup.py
	@if [ -f $@ ] && ls prefcore/_C*.so >/dev/null 2>&1 && [ -z "$$(find $(CSRC) setup.py -newer $@ 2>/dev/null)" ]; \
		then echo "prefcore._C is up to date"; else $(PY) setup.py -q build_ext --inplace; fi
	touch $@

build: $(EXT_STAMP)

cuda-check: $(DEPS_STAMP)
	$(PY) tools/check_cuda.py

# On a GPU machine (tools/gpu_check.py; README "GPU check"). No .venv prerequisite: it builds
# against the machine's own CUDA torch (the .venv's python if there is one, else $(PYTHON)).
GPU_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PY) tools/gpu_check.py

# The main job: the papers' story end to end on the embedded text world (report in runs/demo/).
# DEMO_ARGS passes flags through, e.g. `make demo DEMO_ARGS="--seeds 0,1,2,3"` (adds seed 3 to runs/demo).
DEMO_ARGS ?=
demo: build
	$(PY) -m prefcore.cli demo $(DEMO_ARGS)

demo-quick: build
	$(PY) -m prefcore.cli demo --quick --out runs/demo-quick $(DEMO_ARGS)

test: build cuda-check
	$(PY) -m pytest python_tests -q $(PYTEST_ARGS)
	$(MAKE) bench-smoke

# Every bench case once at its tiny smoke_inputs size, plus the harness and table code: seconds,
# so the bench code cannot rot. Measures nothing.
bench-smoke: build
	$(PY) -m pytest bench/test_bench.py -q --benchmark-disable -p no:cacheprovider

bench: build
	$(PY) -m bench

bench-table: $(DEPS_STAMP)
	$(PY) tools/bench_table.py --readme

clean:
	rm -rf build prefcore/_C*.so $(EXT_STAMP) .pytest_cache
