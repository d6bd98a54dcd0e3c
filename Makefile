# qatlab: the two commands a newcomer needs are `make run` and `make test`.
# Both build .venv first (once; again only when a dependency file changes).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.qatlab-setup
OFFLINE := scripts/offline

.PHONY: setup run test test-fast lint lab lab-instructor student clean

## setup: build .venv from the pinned dependencies in pyproject.toml (idempotent)
setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"qatlab needs Python 3.11, found {sys.version.split()[0]} at {sys.executable}: set PYTHON=/path/to/python3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)
	@echo "setup: .venv is ready"

## run: execute every notebook (papermill) -> build/executed, build/html, build/results.json,
## one kernel per CPU at a time (at most 4; JOBS=1 runs them one by one, each with every CPU)
JOBS ?=
run: setup
	$(OFFLINE) $(PY) -m qatlab.runner $(if $(JOBS),--jobs $(JOBS))

## test: every test: unit tests, doctests, nbval over every notebook, a papermill run of
## every notebook with a second parameter set, student copies, the browser test, ruff.
## One pytest-xdist worker per CPU this process may use (affinity and cgroup quota, at most 4;
## WORKERS=1 for one process), each with one torch thread; --dist loadscope keeps the cells of
## a notebook (nbval) and the tests of a file in one worker, in order. PYTEST_ARGS adds options
## (e.g. PYTEST_ARGS=--junitxml=build/junit.xml for every test's duration).
WORKERS ?= $(shell $(PY) -c 'from qatlab.threads import available_cpus; print(max(1, min(4, int(available_cpus()))))')
test: setup
	$(PY) -m ruff check qatlab tests notebooks
	QATLAB_BUILD=$(CURDIR)/build/test QATLAB_CACHE=$(CURDIR)/build/test/cache QATLAB_THREADS=1 $(OFFLINE) $(PY) -m pytest -n $(WORKERS) --dist loadscope \
		--nbval-lax --durations=25 $(PYTEST_ARGS) tests qatlab notebooks

## test-fast: unit tests and doctests only (no notebooks, no browser)
test-fast: setup
	$(PY) -m pytest tests qatlab -m "not notebook and not browser"

lint: setup
	$(PY) -m ruff check qatlab tests notebooks

## lab: students start here. Your own copies of the notebooks, solutions removed, in student/,
## opened in JupyterLab. A copy that already exists (your work) is never overwritten;
## delete it to get a fresh one.
lab: setup
	$(PY) -m qatlab.student --out student --keep
	$(VENV)/bin/jupyter lab student/

## lab-instructor: JupyterLab on the instructor notebooks in notebooks/ (with the solutions)
lab-instructor: setup
	$(VENV)/bin/jupyter lab notebooks/

## student: the teachers' handout: student copies (solutions removed) -> build/student/,
## regenerated every time
student: setup
	$(PY) -m qatlab.student

clean:
	rm -rf build
