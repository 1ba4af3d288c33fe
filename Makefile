# Two commands on a fresh machine: `make run` (install + main job), `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# A CPU build of torch; set TORCH= (empty) to keep a torch you installed yourself.
TORCH   ?= torch==2.13.0
ARGS    ?=

.PHONY: install run test clean

$(BIN)/thoughtpatch: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/thoughtpatch

run: install
	$(BIN)/thoughtpatch run $(ARGS)

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) src/*.egg-info
