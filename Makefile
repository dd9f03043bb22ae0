# Two-command quick start:  `make demo`  and  `make test`.
# Both create ./.venv and install pinned dependencies on first use.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
PIP      = $(BIN)/python -m pip -q --disable-pip-version-check
OUT     ?= outputs/demo
PYTEST_ARGS ?= -n 2 -q

.PHONY: install install-test demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.runtime: $(BIN)/python requirements.txt requirements-nodeps.txt setup.cfg
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -r requirements-nodeps.txt
	$(PIP) install --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt requirements-torch.txt
	$(PIP) install -r requirements-test.txt
	$(PIP) install -r requirements-torch.txt || echo "optional torch install failed: torch parity tests will be skipped"
	touch $@

install: $(VENV)/.runtime
install-test: $(VENV)/.test

demo: install
	$(BIN)/vtadl-jax demo --out $(OUT)

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install-test
	$(BIN)/python experiments/benchmark.py --out outputs/bench

clean:
	rm -rf $(VENV) outputs
