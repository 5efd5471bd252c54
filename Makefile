# llmq developer tasks. SHARED defaults to the assets folder beside the checkout (absolute: check-wheel
# runs from a temporary folder).
SHARED ?= $(abspath ../shared)
MODEL ?= $(SHARED)/models/smollm2-135m-instruct-q4_1
export LLMQ_DATA_DIR ?= $(SHARED)/data
export HF_HUB_OFFLINE ?= 1
PY ?= python

.PHONY: install test check-wheel demo bench-streaming e2e

install:
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"

test:
	$(PY) -m pytest -q

# The built wheel, installed into a fresh virtual environment, used from outside the checkout (CI runs it).
check-wheel:
	LLMQ_SHARED=$(SHARED) bash scripts/check_wheel.sh

# The main job on the default model: the best measured 4-bit recipe (HIGGS, no calibration data, ~1.5 min),
# then perplexity and KL to the original on WikiText-2 (4 windows of 2048 tokens), side by side.
demo:
	llmq quantize $(MODEL) -o out/smollm2-higgs4 --recipe recipes/higgs-4bit.yaml --overwrite
	llmq eval $(MODEL) out/smollm2-higgs4 --tasks wikitext2,kl --reference $(MODEL) --limit 4

bench-streaming:
	$(PY) scripts/bench_streaming.py

e2e:
	$(PY) scripts/e2e_smollm.py
