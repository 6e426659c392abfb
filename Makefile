# The two commands a new user needs:
#   make run    install into .venv if needed, start the whole pipeline (SQLite default) in the foreground
#   make test   install what the tests need (test servers included) and run the tests
#   make bench  the end-to-end benchmark against Node-RED and the others (BENCHMARKS.md); BENCH_ARGS=--quick
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test install test-servers bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/sensorpipe run

test-servers:
	deploy/test-servers.sh install

test: $(STAMP) test-servers
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP) test-servers
	benchmarks/install-nodered.sh
	$(VENV)/bin/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache data
