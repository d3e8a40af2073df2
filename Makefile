# The README's two commands. Both bootstrap .venv with pip on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip extras of the venv; CI adds gpu (torchao) for the fp8 emulation test: make test EXTRAS=dev,gpu
EXTRAS ?= dev

# Tests never touch the network: a hub miss would otherwise cost ~23 s of retries each. Ray always runs with token
# authentication: a local Ray keeps its token in ~/.ray/auth_token (made on first use), never in the repository.
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_AUTH_MODE=token

.PHONY: repro test exp venv
# One local Ray for the whole DAG, which each Ray stage joins (pipeline/cluster.py: ~9 s less start-up per Ray
# stage on 2 cores, bench/bench_ray_start.py); a RAY_ADDRESS you set is used instead.
repro: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" RAY_AUTH_MODE=token $(BIN)/python -m pipeline.cluster run -- dvc repro

# A profile of profiles/ as a DVC experiment: make exp PROFILE=cifar10 [EXP_ARGS=--queue]
exp: $(STAMP)
	test -n "$(PROFILE)" || (echo "usage: make exp PROFILE=<$$(ls profiles | sed 's/.yaml//' | tr '\n' ' ')>" && false)
	overrides="$$($(BIN)/python -m pipeline.profiles $(PROFILE))" && \
		PATH="$(abspath $(BIN)):$$PATH" RAY_AUTH_MODE=token dvc exp run -n $(PROFILE) $(EXP_ARGS) $$overrides

test: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest $(PYTEST_ARGS)

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[$(EXTRAS)]'
	touch $(STAMP)
