#!/usr/bin/env bash
# Build llmq's wheel, install it (not editable) into a fresh virtual environment and use it from outside the
# checkout: catches packages missing from the wheel and anything that only works from the repository root.
# Needs the shared assets (SmolLM2's tokenizer) beside the checkout, or LLMQ_SHARED.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
shared=$(cd "${LLMQ_SHARED:-$repo/../shared}" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python -m pip wheel --quiet --no-deps -w "$work/dist" "$repo"
python -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -qq --upgrade pip
"$py" -m pip install -qq torch==2.13.0   # the CPU wheel; an unpinned torch would pull CUDA builds
"$py" -m pip install -qq "$work"/dist/*.whl

export LLMQ_DATA_DIR="$shared/data"   # absolute: relative paths would point elsewhere from $work
cd "$work"   # nothing of the checkout on sys.path from here on
"$work/venv/bin/llmq" --help >/dev/null
"$py" "$repo/scripts/make_synthetic_llama.py" tiny --layers 2 --hidden 64 --intermediate 128 --heads 4 \
    --tokenizer-from "$shared/models/smollm2-135m-instruct-q4_1" >/dev/null
"$work/venv/bin/llmq" quantize tiny -o tiny-w8 --method rtn --bits 8 --group-size 32 --calib none >/dev/null 2>&1 \
    || { "$work/venv/bin/llmq" quantize tiny -o tiny-w8b --method rtn --bits 8 --group-size 32 --calib none; exit 1; }
"$py" - <<'PY'
import torch
import llmq
from transformers import AutoModelForCausalLM

assert "site-packages" in llmq.__file__, llmq.__file__
ids = torch.arange(1, 33).unsqueeze(0)
with torch.no_grad():
    fp = AutoModelForCausalLM.from_pretrained("tiny", dtype=torch.float32)(ids).logits
    q_model = AutoModelForCausalLM.from_pretrained("tiny-w8")
    q = q_model(ids).logits.float()
assert type(q_model.model.layers[0].mlp.down_proj).__name__ != "Linear", "the checkpoint did not load as packed layers"
rel = ((q - fp).norm() / fp.norm()).item()
assert torch.isfinite(q).all() and rel < 0.05, rel
print(f"wheel check: {llmq.__file__} quantized and reloaded a tiny Llama (8-bit logits rel. error {rel:.4f})")
PY
