# Two commands for a fresh machine with Python 3.11+:
#   make demo   runs the demo on ./l2-demo-data
#   make test   runs the whole test suite
# Each creates .venv on first use: `make demo` installs only the package,
# `make test` adds the test, lint and doc tools.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
# (the engine's C files, every .c and .h of csrc/, which setup.py lists)
ENGINE_C := $(sort $(wildcard l2_stores/engine/csrc/*.c l2_stores/engine/csrc/*.h))
BUILD_INPUTS := setup.cfg pyproject.toml setup.py l2_stores/_idle_core.c $(ENGINE_C)
HASH := $(shell cat $(BUILD_INPUTS) | cksum | cut -d' ' -f1)
PACKAGE_STAMP := $(VENV)/.package-$(HASH)
DEV_STAMP := $(VENV)/.dev-$(HASH)
# An editable install that puts the source tree on a .pth path: mypy finds it there
# (the default, an import hook, is invisible to mypy).
EDITABLE := --config-settings editable_mode=compat
PYTEST := -m pytest -q -p no:cacheprovider
# What the other Pythons run: the engine, the models and the crash tests.
ENGINE_TESTS := tests/test_engine.py tests/test_run.py tests/test_run_accel.py \
	tests/test_run_writer.py tests/test_levels.py tests/test_mapped_log.py \
	tests/test_values_tail.py tests/test_accel.py tests/test_model.py tests/test_gc_model.py \
	tests/test_batch_model.py tests/test_crash.py tests/test_gc_crash.py \
	tests/test_indexed_file_crash.py tests/test_format1.py tests/test_packaging.py
OTHER_PYTHONS := 3.12 3.13

.PHONY: demo test test-pythons check-packaging lint doc bench clean

$(PACKAGE_STAMP): $(BUILD_INPUTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e . $(EDITABLE)
	rm -f $(VENV)/.package-*
	touch $@

$(DEV_STAMP): $(PACKAGE_STAMP)
	$(VENV)/bin/python -m pip install -q -e '.[dev]' $(EDITABLE)
	rm -f $(VENV)/.dev-*
	touch $@

demo: $(PACKAGE_STAMP)
	$(VENV)/bin/python -m l2_stores demo

# The whole suite with the C accelerator, then on the pure-Python paths (as without a
# C compiler); then mypy, ruff and the guide. (One suite at a time: the tests of merges
# and GCs running beside writers see the timings they were written for.)
test: $(DEV_STAMP)
	$(VENV)/bin/python $(PYTEST)
	L2_STORES_PURE_PYTHON=1 $(VENV)/bin/python $(PYTEST)
	$(VENV)/bin/python -m mypy
	$(VENV)/bin/python -m ruff check l2_stores tests bench
	$(VENV)/bin/python -m sphinx -W --keep-going -q -b html doc doc/_build/html

# The engine, model and crash tests on each other supported Python found here
# (python3.12, ..., or pyenv's), each in its own .venv-3.X.
test-pythons:
	@set -e; for version in $(OTHER_PYTHONS); do \
		python=$$(.ci/python $$version); \
		if [ -z "$$python" ] && [ -n "$(REQUIRE_PYTHONS)" ]; then \
			echo "no Python $$version here, and REQUIRE_PYTHONS is set" >&2; exit 1; fi; \
		if [ -z "$$python" ]; then echo "no Python $$version here: skipped"; continue; fi; \
		echo "Python $$version: $$python"; \
		$$python -m venv .venv-$$version; \
		.venv-$$version/bin/python -m pip install -q -e '.[test]' $(EDITABLE); \
		.venv-$$version/bin/python $(PYTEST) $(ENGINE_TESTS); \
	done

# The wheel and the sdist: built, installed in fresh virtual environments, and
# smoke-tested from outside the source tree: the wheel with the C accelerator, the
# sdist built with no C compiler (pure Python, with the import's warning).
check-packaging: $(DEV_STAMP)
	rm -rf dist .packaging && mkdir -p .packaging
	$(VENV)/bin/python -m build --outdir dist . > .packaging/build.log 2>&1 \
		|| (cat .packaging/build.log; exit 1)
	tail -1 .packaging/build.log
	$(PYTHON) -m venv .packaging/wheel
	.packaging/wheel/bin/python -m pip install -q dist/*.whl
	cd .packaging && wheel/bin/python $(CURDIR)/tests/smoke_installed.py --accelerated yes
	$(PYTHON) -m venv .packaging/sdist
	CC=/bin/false .packaging/sdist/bin/python -m pip install -q dist/*.tar.gz
	cd .packaging && sdist/bin/python $(CURDIR)/tests/smoke_installed.py --accelerated no \
		2> sdist-stderr.txt; status=$$?; cat sdist-stderr.txt; \
		grep -q "C accelerator is not in use" sdist-stderr.txt \
		|| { echo "no warning shown without the accelerator"; exit 1; }; exit $$status
	# mypy, run on a user's code outside the tree, finds the editable install of .venv
	printf '[mypy]\nstrict = True\n[mypy-construct.*]\nignore_missing_imports = True\n' \
		> .packaging/mypy.ini
	cd .packaging && $(CURDIR)/$(VENV)/bin/python -m mypy --config-file mypy.ini \
		--no-incremental $(CURDIR)/tests/typing/typed_ok.py
	rm -rf .packaging

# The guide, warnings as errors: open doc/_build/html/index.html
doc: $(DEV_STAMP)
	$(VENV)/bin/python -m sphinx -W --keep-going -q -b html doc doc/_build/html

bench: $(DEV_STAMP)
	$(VENV)/bin/python -m pip install -q -e '.[bench]' $(EDITABLE)
	$(VENV)/bin/python bench/bench.py

lint: $(DEV_STAMP)
	$(VENV)/bin/python -m mypy
	$(VENV)/bin/python -m ruff check l2_stores tests bench

clean:
	rm -rf $(VENV) .venv-3.* l2-demo-data doc/_build .pytest_cache .mypy_cache .ruff_cache build \
		dist .packaging *.egg-info
	rm -f l2_stores/engine/_accel.*.so l2_stores/engine/_runs.*.so l2_stores/_idle_core.*.so
