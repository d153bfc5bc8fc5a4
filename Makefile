# Framewise: two commands on a fresh machine.
#   make serve   set up, make the tiny demo checkpoint if missing, start the gateway on 127.0.0.1:8000
#   make test    set up, then the whole test suite
#   make demo    the offline engine demo (one video, one answer, timings)
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_MODEL ?= .cache/models/tc-llava-demo
PYTEST_ARGS ?=
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo-model serve demo test lint
setup:
	@bash scripts/setup.sh

demo-model: setup
	@[ -f $(DEMO_MODEL)/config.json ] || $(BIN)/framewise demo-model --arch tc-llava --out $(DEMO_MODEL)

serve: demo-model
	$(BIN)/framewise selfcheck
	$(BIN)/framewise serve --model $(DEMO_MODEL) $(SERVE_ARGS)

demo: demo-model
	$(BIN)/framewise demo --model $(DEMO_MODEL)

test: demo-model
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
