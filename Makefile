# Developer entry points. Targets here: venv, gen, proto-lint, lock, clean-gen.
# (Other targets, e.g. docker, are added by their owners below; keep this part additive.)

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
# `make gen` works with the venv if there is one, else with $(PYTHON) (needs grpcio-tools).
GEN_PY := $(if $(wildcard $(VPY)),$(VPY),$(PYTHON))

.PHONY: venv gen proto-lint lock clean-gen

## venv: create .venv and install nestmmu editable with dev extras (also generates gRPC code)
venv: $(VPY)
$(VPY): pyproject.toml setup.py requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install -c requirements.lock -e '.[dev]'
	@touch $(VPY)

## gen: regenerate src/nestmmu/gen from protos/ (after editing a .proto in an editable install)
gen:
	PYTHONPATH=src $(GEN_PY) -m nestmmu.protos

## proto-lint: buf lint (STANDARD) and build of protos/ (buf comes from the buf-bin dev wheel)
proto-lint:
	cd protos && $(abspath $(VENV))/bin/buf lint && $(abspath $(VENV))/bin/buf build -o /dev/null

## lock: re-resolve requirements.lock (runtime+dev) and requirements-runtime.lock in scratch venvs
# (pip freeze of a fresh venv; --all keeps setuptools, which grpcio-tools needs at run time)
LOCK_TMP ?= /tmp/nestmmu-lock
lock:
	rm -rf $(LOCK_TMP) && $(PYTHON) -m venv $(LOCK_TMP)/rt && $(PYTHON) -m venv $(LOCK_TMP)/dev
	$(LOCK_TMP)/rt/bin/pip install --quiet --upgrade pip && $(LOCK_TMP)/rt/bin/pip install --quiet .
	$(LOCK_TMP)/dev/bin/pip install --quiet --upgrade pip && $(LOCK_TMP)/dev/bin/pip install --quiet '.[dev]'
	{ echo "# Runtime dependencies of nestmmu, exact pins (make lock). The Docker image installs from these."; \
	  $(LOCK_TMP)/rt/bin/pip freeze --all --exclude pip --exclude nestmmu; } > requirements-runtime.lock
	{ echo "# Runtime + dev dependencies of nestmmu, exact pins (make lock): pip install -r requirements.lock -e ."; \
	  $(LOCK_TMP)/dev/bin/pip freeze --all --exclude pip --exclude nestmmu; } > requirements.lock
	rm -rf $(LOCK_TMP)

## clean-gen: remove the generated code
clean-gen:
	rm -rf src/nestmmu/gen

# ---------------------------------------------------------------------------
# Containers and the whole test run (owner: deploy/; see deploy/README.md).
# No registry on our machines: the base image is built from Debian packages,
# Python packages come from a host-side wheelhouse, Compose v2 from PyPI.

.PHONY: compose images up down test

## compose: make `docker compose` (v2) work, installing the plugin from PyPI if missing
compose:
	bash deploy/ensure-compose.sh

## images: Compose v2 + base image + wheelhouse + service image (cached; slow only the first time)
images:
	bash deploy/images.sh

## up: start l0, l1a, l1b, l2, wait until healthy, run the workload and show its report
up:
	bash deploy/up.sh

## down: stop and remove the cluster (images are kept)
down:
	bash deploy/down.sh

## test: the whole suite as CI runs it: venv, codegen, images, pytest incl. slow and container tests
# -m '' cancels any marker filter from the pytest config, so slow/containers tests run too.
# pytest's exit code 5 ("no tests collected") is a failure, like any non-zero code.
PYTEST_ARGS ?=
test: venv
	$(MAKE) gen
	bash deploy/images.sh >/dev/null
	@rc=0; $(VPY) -m pytest -m '' -ra $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests: failing" >&2; fi; \
	exit $$rc
