# Framewise: two commands on a fresh machine.
#   make serve   set up, make the tiny demo checkpoint if missing, start the gateway on 127.0.0.1:8000
#   make test    set up, then the whole test suite (Docker tests included; make test-fast leaves them out)
#   make demo    the offline engine demo (one video, one answer, timings)
#   make loadtest  locust against a gateway on 127.0.0.1 (HOST=http://127.0.0.1:PORT, else one on the demo model)
#   make chaos     the mixed locust profile while faults hit Redis, a gateway and a worker; a ledger of every job
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_MODEL ?= .cache/models/tc-llava-demo
PYTEST_ARGS ?=
# two pytest workers, one per CPU, each with its own engines (tests/lanes.py); LANES=0 runs one process
LANES ?= $(shell [ "$$(nproc)" -ge 2 ] && echo 2 || echo 0)
PYTEST_LANES := $(if $(filter-out 0 1,$(LANES)),-n $(LANES))
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo-model serve demo test test-fast test-docker lint loadtest chaos
setup:
	@bash scripts/setup.sh

demo-model: setup
	@[ -f $(DEMO_MODEL)/config.json ] || $(BIN)/framewise demo-model --arch tc-llava --out $(DEMO_MODEL)

serve: demo-model
	$(BIN)/framewise selfcheck
	$(BIN)/framewise serve --model $(DEMO_MODEL) $(SERVE_ARGS)

demo: demo-model
	$(BIN)/framewise demo --model $(DEMO_MODEL)

# everything, the Docker tests included (they install docker.io/docker-compose/debootstrap when missing and
# run a private dockerd under a temp dir); `make test-fast` is the inner loop: no vLLM engine, no Docker (a
# conftest guard fails a test that starts either without its marker); `make test-docker` runs only Docker
test: demo-model
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_LANES) $(PYTEST_ARGS)

test-fast: demo-model
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_LANES) -m "not engine and not docker" $(PYTEST_ARGS)

test-docker: demo-model
	$(BIN)/python -m pytest -m docker $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

USERS ?= 4
RUN_TIME ?= 60
TAGS ?= mixed
loadtest: demo-model
	$(BIN)/python -m loadtests.run $(if $(filter http%,$(HOST)),--host $(HOST)) --users $(USERS) --run-time $(RUN_TIME) --tags $(TAGS) $(LOADTEST_ARGS)

# a fault run under load (loadtests/chaos.py): its own Redis, gateway and worker on the demo checkpoint; the
# gateway's engine core, Redis, the gateway and the worker are killed in turn and restarted; exit 1 unless
# every accepted job ended exactly once. CHAOS_ARGS="--quick" is the form tests/test_chaos.py runs
CHAOS_ARGS ?=
chaos: demo-model
	$(BIN)/python -m loadtests.chaos $(CHAOS_ARGS)
