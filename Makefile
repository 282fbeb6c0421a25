# `make test` and `make demo` work on a fresh clone: they create .venv, install the pinned
# dependencies (torch pinned to the CPU wheel 2.13.0: never an unpinned torch) and the package.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: test demo lint install clean

install: $(STAMP)

$(STAMP): requirements.txt setup.py pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu and not slow" tests

demo: $(STAMP)
	$(PY) -m adapt_fast.train --output_dir runs/demo --overwrite_output_dir

lint: $(STAMP)
	$(VENV)/bin/ruff check adapt_fast kernels bench tests

clean:
	rm -rf $(VENV) build *.egg-info
