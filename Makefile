# Two entry points (see README): `make demo` runs the main job, `make test` runs the test suite.
# Both create or refresh .venv (Python 3.12) when pyproject.toml changes. The installed modules
# are byte-compiled on all cores, not by pip one after the other (41 s instead of 57 s on the
# 2-core machine): where PYTHONDONTWRITEBYTECODE is set, as on the project's machines, nothing
# compiled later is kept, and every test process (CLI runs, notebook kernels) would compile
# jax's sources again (the kill-at-every-file-boundary test, 10 processes: 129 s against 72 s).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.12 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs notebooks clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 12), f"numpyro_ebm needs Python >= 3.12, found {sys.version.split()[0]}: install 3.12 (pyenv install 3.12) or set PYTHON=/path/to/python3.12"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -e '.[dev]'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true  # a speed-up only
	touch $(STAMP)

demo: $(STAMP)
	MPLBACKEND=Agg $(BIN)/python -m numpyro_ebm.cli demo $(ARGS)

# CI time is mostly XLA compiling (session 30, jax's compile-time events, xdist phase: of
# 2355 s of test time summed over both workers, 1243 s were XLA compiling in the workers'
# own processes, notebook kernels and other subprocesses not counted, and 248 s tracing and
# lowering; of 239 compilations that looked in the persistent cache, 27 found their program
# there: few programs repeat between test files). The tests compile with most of XLA's
# optimisations off
# (JAX_DISABLE_MOST_OPTIMIZATIONS: backend level 0, no expensive LLVM passes; test_infer.py
# took 188 s against 220 s at level 1 and more at the default level 2; the notebooks' kernels,
# which run longer programs, turn them back on: notebooks/conftest.py), and the compilation
# cache shares compiled programs between the test processes (the CLI subprocesses compile
# many of the tests' programs again). pytest-xdist hands each worker whole files in the order
# collected (--no-loadscope-reorder: by default it hands out the files with the most tests
# first, and so the notebooks, one test each and up to 105 s, last): the longest first, so the
# short ones fill the end of both workers (longest processing time first; the order of the
# seconds per file measured in session 26; the files not named take under 30 s each).
# --durations lists the slowest tests at the end of every run. Tests marked `alone` run after
# the others, with nothing beside them (the two-process jax.distributed test: a hang there is
# then the library's or jax's, not a neighbour's load; see tests/test_sharding.py).
LONG_TESTS := tests/test_train.py tests/test_log_z_tracking.py tests/test_training.py \
	tests/test_cli.py tests/test_sharding.py tests/test_infer.py notebooks/log_z.ipynb \
	tests/test_distribution.py tests/test_checkpoint.py tests/test_generator.py \
	notebooks/diagnostics.ipynb tests/test_logz.py tests/test_public_api.py \
	tests/test_data_bound.py tests/test_diagnostics.py tests/test_cli_digits.py \
	tests/test_objectives.py notebooks/generator.ipynb tests/test_samplers.py \
	tests/test_sampler_inputs.py tests/test_tempering.py notebooks/conditional.ipynb notebooks/ebm_prior.ipynb \
	tests/test_cli_runs.py tests/test_energies.py tests/test_cli_data.py \
	notebooks/quickstart.ipynb tests/test_selection.py
# every file by name: given a folder too, pytest collects the files under it in its own
# (alphabetical) order, whatever the order of the command line
TEST_FILES := $(LONG_TESTS) $(filter-out $(LONG_TESTS),$(sort $(wildcard notebooks/*.ipynb tests/test_*.py)))
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	JAX_DISABLE_MOST_OPTIMIZATIONS=1 \
	JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.cache/jax NUMPYRO_EBM_SMALL=1 MPLBACKEND=Agg \
		$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25 --nbmake -m "not alone" $(TEST_FILES)
	JAX_DISABLE_MOST_OPTIMIZATIONS=1 NUMPYRO_EBM_SMALL=1 MPLBACKEND=Agg \
		$(BIN)/python -m pytest -q --durations=5 -m alone tests/
	# not -q: mkdocs counts only the warnings it logs, and -q drops them, so --strict would pass them
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) site .pytest_cache
