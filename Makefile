# Framewise: two commands on a fresh machine.
#   make serve   set up, make the tiny demo checkpoint if missing, run the engine demo
#   make test    set up, then the whole test suite
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_MODEL ?= .cache/models/tc-llava-demo
PYTEST_ARGS ?=
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo-model serve test lint
setup:
	@bash scripts/setup.sh

demo-model: setup
	@[ -f $(DEMO_MODEL)/config.json ] || $(BIN)/framewise demo-model --arch tc-llava --out $(DEMO_MODEL)

serve: demo-model
	$(BIN)/framewise selfcheck
	$(BIN)/framewise demo --model $(DEMO_MODEL)

test: demo-model
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
