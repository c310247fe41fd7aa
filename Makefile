# One entry point per task. Each target creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q

.PHONY: demo test lint format bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The default install: the package, the converter (torch CPU) and the sample photos.
$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[convert,samples]'
	touch $@

$(VENV)/.bench: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[convert,samples,bench]'
	touch $@

# The tests include a smoke run of every benchmark runner, Ray Data's among them, and the
# docs build.
$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[convert,samples,test,bench,docs]'
	touch $@

$(VENV)/.docs: pyproject.toml | $(BIN)/python
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
# process only: the `ics` and `ics serve` processes the tests start are not counted. Set from
# a run of a third of the test files (66 %); a run of a few files only wants COV_FLOOR=0.
COV_FLOOR ?= 65

# The store tests run on SQLite and on a real PostgreSQL: ICS_TEST_POSTGRES_URL names one, or
# scripts/postgres.sh installs (Debian) and starts a local one. ICS_SKIP_POSTGRES=1 skips
# those tests on purpose.
test: $(VENV)/.test
	@scripts/heldout-photos.sh || true
	@if [ -z "$$ICS_TEST_POSTGRES_URL" ] && [ "$$ICS_SKIP_POSTGRES" != 1 ]; then \
	    url="$$(scripts/postgres.sh start)" || { \
	        echo "make test: cannot start a local PostgreSQL for the store tests (see above)." >&2; \
	        echo "  Set ICS_TEST_POSTGRES_URL=postgresql://USER:PASSWORD@HOST/DB (a role that may" >&2; \
	        echo "  create databases), or ICS_SKIP_POSTGRES=1 to skip those tests on purpose." >&2; \
	        exit 1; }; \
	    export ICS_TEST_POSTGRES_URL="$$url"; \
	fi; \
	$(BIN)/python -m pytest --cov=ics_service --cov-report=term:skip-covered \
	    --cov-fail-under=$(COV_FLOOR) $(PYTEST_ARGS)
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

lint: $(VENV)/.test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(VENV)/.test
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) demo site .pytest_cache .mypy_cache .ruff_cache
