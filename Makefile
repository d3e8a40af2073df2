# The README's two commands. Both build .venv with pip from a lock of every dependency, hashes included, on first use
# and whenever the lock changes (docs/environment.md).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# The lock the venv is built from: lock.txt is the project with its dev and s3 extras; lock-gpu.txt adds the gpu extra
# (torchao, for train.fp8), which CI installs for the fp8 emulation test: make test LOCK=requirements/lock-gpu.txt
LOCK ?= requirements/lock.txt
# KEEP_TORCH=1: the venv sees the torch of $(PYTHON) (your CUDA build, in a conda env or a container) and installs the
# rest of the lock; every manifest records the torch that ran.
KEEP_TORCH ?=
# The venv is named by the lock's bytes and that choice: another lock (a git checkout, `make lock`, another LOCK) has
# no stamp yet, so the venv is rebuilt from nothing, never patched: nothing of the former environment lingers.
LOCK_ID := $(shell cat $(LOCK) 2>/dev/null | sha256sum | cut -c1-16)$(if $(KEEP_TORCH),-keep-torch)
LOCK_STAMP := $(VENV)/.lock-$(LOCK_ID)
STAMP := $(VENV)/.installed

# Tests never touch the network: a hub miss would otherwise cost ~23 s of retries each. Ray always runs with token
# authentication: a local Ray keeps its token in ~/.ray/auth_token (made on first use), never in the repository.
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_AUTH_MODE=token

.PHONY: repro test test-fast lint exp venv lock check-lock
# One local Ray for the whole DAG, which each Ray stage joins (pipeline/cluster.py: ~9 s less start-up per Ray
# stage on 2 cores, bench/bench_ray_start.py); a RAY_ADDRESS you set is used instead.
repro: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" RAY_AUTH_MODE=token $(BIN)/python -m pipeline.cluster run -- dvc repro

# A profile of profiles/ as a DVC experiment: make exp PROFILE=cifar10 [EXP_ARGS=--queue]
exp: $(STAMP)
	test -n "$(PROFILE)" || (echo "usage: make exp PROFILE=<$$(ls profiles | sed 's/.yaml//' | tr '\n' ' ')>" && false)
	overrides="$$($(BIN)/python -m pipeline.profiles $(PROFILE))" && \
		PATH="$(abspath $(BIN)):$$PATH" RAY_AUTH_MODE=token dvc exp run -n $(PROFILE) $(EXP_ARGS) $$overrides

# The whole suite, with its 15 slowest tests listed at the end, on two pytest-xdist workers: a group of tests that
# share fixtures runs whole on one worker, the longest groups first (tests/conftest.py). XDIST= runs it in one process.
XDIST ?= -n 2 --dist loadgroup --no-loadscope-reorder
test: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest $(XDIST) --durations=15 $(PYTEST_ARGS)

# The inner loop: every test not marked slow (no end-to-end repro, cluster or server), a few minutes on 2 cores.
test-fast: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest $(XDIST) -m "not slow" --durations=10 $(PYTEST_ARGS)

# ruff's lint and format check (pyproject.toml); `ruff format` and `ruff check --fix` rerun no stage: a stage depends
# on its code fingerprint, which a reformat or a re-sorted import block leaves as it was.
lint: $(STAMP)
	$(BIN)/ruff check pipeline stages tests bench requirements
	$(BIN)/ruff format --check pipeline stages tests bench requirements

venv: $(STAMP)

# The lock's packages alone, with --no-deps: the lock is the whole resolution, so pip resolves nothing and downloads
# only what the lock names, each checked against its hashes.
$(LOCK_STAMP):
	$(PYTHON) requirements/lockfile.py check $(LOCK)
	test ! -e $(VENV) -o -e $(VENV)/lock.txt || \
		(echo "error: $(VENV) was not built from a lock, so make leaves it alone: remove it (docs/environment.md)" && false)
ifneq ($(KEEP_TORCH),)
	$(PYTHON) -c "import sys; sys.exit(sys.prefix != sys.base_prefix)" || \
		(echo "error: KEEP_TORCH=1 needs a base Python (a conda env's, a container's), not a venv's" && false)
	$(PYTHON) -c "import torch" 2>/dev/null || \
		(echo "error: KEEP_TORCH=1 keeps the torch of $(PYTHON), which has none: install yours there, or set PYTHON" && false)
endif
	rm -rf $(VENV)
	$(PYTHON) -m venv $(if $(KEEP_TORCH),--system-site-packages) $(VENV)
	$(if $(KEEP_TORCH),$(PYTHON) requirements/lockfile.py without-torch,cat) $(LOCK) > $(VENV)/lock.txt
	$(BIN)/python -m pip install --require-hashes --no-deps -r $(VENV)/lock.txt
	touch $@

# The project on top, editable, built with the lock's setuptools (no build isolation, which would fetch the newest).
# pip check: the lock's pins fit each other; with KEEP_TORCH a base Python's other packages may not, so it only warns.
$(STAMP): $(LOCK_STAMP) pyproject.toml
	$(PYTHON) requirements/lockfile.py check $(LOCK)
	$(BIN)/python -m pip install --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check $(if $(KEEP_TORCH),|| echo "warning: pip check failed over $(PYTHON)'s packages")
	touch $@

# Fails when a lock and pyproject.toml disagree; offline and under a second, so CI runs it before building anything.
check-lock:
	$(PYTHON) requirements/lockfile.py check

# Recompiles both locks from pyproject.toml with pip-compile: pins that still fit are kept (UPGRADE=1 takes the newest
# of everything). lock-gpu.txt is resolved first and constrains lock.txt, so the two never pin a package differently.
# pip's own configured constraints (a cap on torch, say) bind the lock too: it must install where it is made.
LOCK_TOOLS := .venv-lock
PIP_COMPILE := CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_TOOLS)/bin/pip-compile --quiet --generate-hashes \
	--allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links --build-deps-for editable \
	$(if $(UPGRADE),--upgrade) \
	-c $(LOCK_TOOLS)/pip-constraints.txt
lock:
	test -x $(LOCK_TOOLS)/bin/pip-compile || ($(PYTHON) -m venv $(LOCK_TOOLS) && \
		$(LOCK_TOOLS)/bin/python -m pip install --quiet pip==26.3 pip-tools==7.7.0)
	$(PYTHON) -m pip config list | sed -n "s/^.*\.constraint='\(.*\)'$$/\1/p" | xargs -r cat \
		> $(LOCK_TOOLS)/pip-constraints.txt
	$(PIP_COMPILE) --extra dev --extra gpu --extra s3 -o requirements/lock-gpu.txt pyproject.toml
	$(PYTHON) requirements/lockfile.py stamp requirements/lock-gpu.txt dev,gpu,s3
	$(PIP_COMPILE) --extra dev --extra s3 -c requirements/lock-gpu.txt -o requirements/lock.txt pyproject.toml
	$(PYTHON) requirements/lockfile.py stamp requirements/lock.txt dev,s3
	$(PYTHON) requirements/lockfile.py check
