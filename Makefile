# One entry point per task. Each target creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Every install takes its versions from the lock (`make lock` writes it; see CONTRIBUTING.md).
LOCK := requirements/lock.txt
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q -c $(LOCK)
# What the tests and lint need: every extra (the install check installs each in its own venv).
TEST_EXTRAS := convert,samples,parquet,postgres,moderation,bench,docs,test

.PHONY: demo test lint format bench bench-store docs lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The default install: the package, the converter (torch CPU) and the sample photos.
$(VENV)/.demo: pyproject.toml $(LOCK) | $(BIN)/python
	@echo "make: installing ICS with the convert and samples extras into $(VENV) from $(LOCK)"
	$(PIP) -e '.[convert,samples]'
	touch $@

$(VENV)/.bench: pyproject.toml $(LOCK) | $(BIN)/python
	@echo "make: installing ICS with the convert, samples and bench extras into $(VENV) from $(LOCK)"
	$(PIP) -e '.[convert,samples,bench]'
	touch $@

# The tests include a smoke run of every benchmark runner, Ray Data's among them, and the
# docs build.
$(VENV)/.test: pyproject.toml $(LOCK) | $(BIN)/python
	@echo "make: installing ICS with the extras $(TEST_EXTRAS) into $(VENV) from $(LOCK)"
	$(PIP) -e '.[$(TEST_EXTRAS)]'
	touch $@

$(VENV)/.docs: pyproject.toml $(LOCK) | $(BIN)/python
	@echo "make: installing ICS with the docs extra into $(VENV) from $(LOCK)"
	$(PIP) -e '.[docs]'
	touch $@

demo: $(VENV)/.demo
	$(BIN)/ics models prepare efficientnet-lite0
	$(BIN)/python -m ics_service.samples demo/photos
	@echo
	@# broken.jpg FAILS alone (one failure tolerated); low-confidence photos are flagged.
	@echo "ics classify demo/photos --table --tolerated-failure-count 1"
	@$(BIN)/ics classify demo/photos --table --tolerated-failure-count 1

# Line coverage of ics_service that `make test` must reach, in percent. Measured in the test
# process only: the `ics` and `ics serve` processes the tests start are not counted (the
# model, server and gRPC work of 2026-12-08 is tested mostly through such processes, so the
# in-process figure fell from 91.2 % to 87.6 %, CI run of ff818bc). Set a point under the
# whole suite's figure; a run of a few files only wants COV_FLOOR=0.
COV_FLOOR ?= 86

# pytest's worker processes (pytest-xdist): most tests wait on the processes and servers they
# start, so two workers on two cores take about half the time of one. Each test file runs
# whole in one worker (--dist loadfile), so a module's fixtures are built once.
# PYTEST_WORKERS=0 runs the tests in the pytest process itself.
PYTEST_WORKERS ?= 2

# The store tests run on SQLite and on a real PostgreSQL: ICS_TEST_POSTGRES_URL names one, or
# scripts/test-services.sh starts the local one (scripts/postgres.sh) and stops it at the end.
# ICS_SKIP_POSTGRES=1 skips those tests on purpose. Before pytest, the install check installs
# the built wheel into a fresh venv, with no extras and then each extra, and runs it there.
test: $(VENV)/.test
	@scripts/heldout-photos.sh || true
	@scripts/debian-package.sh /usr/bin/chromium chromium "the browser tests" || true
	@scripts/test-services.sh sh -c \
	    '$(BIN)/python scripts/install-check.py && $(BIN)/python -m pytest "$$@"' pytest \
	    --cov=ics_service --cov-report=term:skip-covered --cov-fail-under=$(COV_FLOOR) \
	    -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)
	$(MAKE) --no-print-directory docs

# The docs site (docs/, mkdocs.yml) into site/, offline; --strict fails on a broken link or
# a page missing from the nav. The settings and CLI pages are generated from the code.
docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# Every benchmark runner, interleaved; writes benchmarks/RESULTS.md. Knobs (environment or
# make variables): BENCH_N (small photos, 1500), BENCH_N_LARGE (100), BENCH_REPEATS (2),
# BENCH_MEM_N (20000; 0 skips), BENCH_RUNNERS (subset), BENCH_SEED, BENCH_SCALING (0 skips
# the scaling tables), BENCH_REQUIRE_QUIET=1 (publish nothing when busy); see
# BENCH_ARGS=--help. The committed run took 23.6 minutes on 2 cores.
# A quick run: make bench BENCH_N=200 BENCH_N_LARGE=10 BENCH_REPEATS=1 BENCH_MEM_N=0 BENCH_SCALING=0
bench: $(VENV)/.bench
	@scripts/heldout-photos.sh || true
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# The store's write rate: results recorded per second by 1, 4 and 16 concurrent writer
# processes, on SQLite and on PostgreSQL (ICS_TEST_POSTGRES_URL, or the local one that
# scripts/postgres.sh starts); writes benchmarks/store/results.json, which the capacity
# figures (python -m benchmarks.capacity) read. BENCH_STORE_ARGS=--help for its knobs.
bench-store: $(VENV)/.test
	$(BIN)/python -m benchmarks.store_writes $(BENCH_STORE_ARGS)

lint: $(VENV)/.test
	$(BIN)/ruff check src tests benchmarks scripts examples
	$(BIN)/ruff format --check src tests benchmarks scripts examples
	$(BIN)/mypy
	$(BIN)/mypy scripts/install-check.py
	$(BIN)/lint-imports

format: $(VENV)/.test
	$(BIN)/ruff format src tests benchmarks scripts examples
	$(BIN)/ruff check --fix src tests benchmarks scripts examples

# Write requirements/lock.txt again from pyproject.toml, keeping the pins that still fit
# (LOCK_ARGS=--upgrade moves every pin to the newest release; --upgrade-package NAME one).
# pip-tools runs from its own venv, so the project's pip stays as the lock has it.
lock:
	@[ -x $(VENV)-lock/bin/pip-compile ] || { $(PYTHON) -m venv $(VENV)-lock && \
	    $(VENV)-lock/bin/python -m pip install --disable-pip-version-check -q 'pip-tools==7.7.0'; }
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)-lock/bin/pip-compile -q --all-extras \
	    --strip-extras --allow-unsafe --no-emit-find-links --no-emit-index-url $(LOCK_ARGS) \
	    -o $(LOCK) pyproject.toml

clean:
	rm -rf $(VENV) $(VENV)-lock demo site .pytest_cache .mypy_cache .ruff_cache
