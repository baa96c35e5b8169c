# The two setup-free commands: `make quickstart` and `make test`. Both bootstrap .venv idempotently.
VENV ?= .venv
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: bootstrap quickstart test test-all test-engines bench docs clean

bootstrap:
	@bash scripts/bootstrap.sh

quickstart: bootstrap
	$(VENV)/bin/exprag quickstart

test: bootstrap
	$(VENV)/bin/python -m pytest -m "not slow" -q

test-all: bootstrap
	$(VENV)/bin/python -m pytest -q

# A real vLLM CPU server (its own .venv-vllm, created here) with SmolLM2 and an exprag-trained adapter.
test-engines: bootstrap
	bash scripts/serve_vllm.sh --install-only
	$(VENV)/bin/python -m pytest -m engines -q -s tests/llm/test_llm_vllm.py

bench: bootstrap
	$(VENV)/bin/python bench/run_all.py $(if $(BANK_SIZES),--bank-sizes $(BANK_SIZES))

# The docs site (MkDocs + Material + mkdocstrings), built offline and strictly (a broken link fails) into site/.
docs: bootstrap
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/python -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache runs site
