# The two commands a new user needs:
#   make run    install into .venv if needed, start the whole pipeline (SQLite default) in the foreground
#   make test   install what the tests need (test servers included) and run the tests
#   make bench  the end-to-end benchmark against Node-RED and the others (BENCHMARKS.md); BENCH_ARGS=--quick
#   make install  the developer's .venv: the package (editable) with every extra (test, bench)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test install test-servers bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

# The package alone (what `make run` needs), then each extra on top when a target needs it.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet -e .
	touch $(STAMP)

$(VENV)/.installed-%: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet -e '.[$*]'
	touch $@

install: $(VENV)/.installed-dev

run: $(STAMP)
	$(VENV)/bin/sensorpipe run

test-servers:
	deploy/test-servers.sh install

test: $(VENV)/.installed-test test-servers
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-bench test-servers
	benchmarks/install-nodered.sh
	$(VENV)/bin/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache data
