# Two commands for a fresh machine with Python 3.11+:
#   make demo   runs the demo on ./l2-demo-data
#   make test   runs the whole test suite
# Each creates .venv on first use.

PYTHON ?= python3
VENV := .venv
# (the engine's C files, every .c and .h of csrc/, which setup.py lists)
ENGINE_C := $(sort $(wildcard l2_stores/engine/csrc/*.c l2_stores/engine/csrc/*.h))
BUILD_INPUTS := setup.cfg pyproject.toml setup.py l2_stores/_idle_core.c $(ENGINE_C)
STAMP := $(VENV)/.installed-$(shell cat $(BUILD_INPUTS) | cksum | cut -d' ' -f1)

.PHONY: demo test lint doc bench clean

$(STAMP): $(BUILD_INPUTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(VENV)/bin/python -m l2_stores demo

# The whole suite, then again on the pure-Python paths (as without a C compiler).
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
	L2_STORES_PURE_PYTHON=1 $(VENV)/bin/python -m pytest -q
	$(VENV)/bin/python -m mypy
	$(VENV)/bin/python -m ruff check l2_stores tests bench
	$(VENV)/bin/python -m sphinx -W --keep-going -q -b html doc doc/_build/html

# The guide, warnings as errors: open doc/_build/html/index.html
doc: $(STAMP)
	$(VENV)/bin/python -m sphinx -W --keep-going -q -b html doc doc/_build/html

bench: $(STAMP)
	$(VENV)/bin/python -m pip install -q -e '.[bench]'
	$(VENV)/bin/python bench/bench.py

lint: $(STAMP)
	$(VENV)/bin/python -m mypy
	$(VENV)/bin/python -m ruff check l2_stores tests bench

clean:
	rm -rf $(VENV) l2-demo-data doc/_build .pytest_cache .mypy_cache .ruff_cache build *.egg-info
	rm -f l2_stores/engine/_accel.*.so l2_stores/engine/_runs.*.so
