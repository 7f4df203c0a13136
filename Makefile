# fedgen: `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.fedgen-installed
DEMO_DIR ?= demo
PYTEST_ARGS ?=

.PHONY: install demo test test-fast fixtures bench node-image clean

install: $(STAMP)

# torch first, pinned: a CPU wheel of exactly this version is available here, while any other
# torch requirement would pull a multi-GB CUDA build. Developers and CI get the study side
# (aggregator/analyst: Hydra, msprime, plots) and the test tools; a site node installs only
# 'fedgen[node]' (nodes/README.md).
$(STAMP): pyproject.toml setup.py fedgen/stats/_glmkernel.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[study,test]'
	@# an editable install is not byte-compiled, and with PYTHONDONTWRITEBYTECODE set every
	@# process (each site worker, SuperNode, ServerApp) would compile fedgen again as it starts
	$(PY) -m compileall -q fedgen
	@touch $(STAMP)

demo: install
	$(VENV)/bin/fedgen simulate --out $(DEMO_DIR)/data --seed 1
	FEDGEN_DEMO_DIR=$(DEMO_DIR) $(VENV)/bin/fedgen run output_dir=$(DEMO_DIR)/results
	@echo "Hong Kong scores its own patients with the federated T2D model:"
	$(VENV)/bin/fedgen score --model $(DEMO_DIR)/results/model --vcf $(DEMO_DIR)/data/hk/genotypes.vcf.gz \
	    --samples $(DEMO_DIR)/data/hk/samples.tsv --out $(DEMO_DIR)/results/hk.scores.tsv --phenotype T2D
	$(VENV)/bin/fedgen ledger --state-dir $(DEMO_DIR)/data/hk/fedgen-state

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

fixtures: install
	$(PY) scripts/make_reference_fixtures.py
	$(PY) scripts/make_hwe_fixtures.py

bench: install
	$(PY) scripts/bench_ingest.py

# The site node's container image (fedgen[node], runs as UID 10001); needs Docker.
NODE_IMAGE ?= fedgen-node:0.1.0
node-image:
	docker build -t $(NODE_IMAGE) -f nodes/compose/Dockerfile .

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
