"""Side check behind reports/rotation_smollm2.md: RTN g128 on SmolLM2 in memory (`quantize_`) with each --rotate
mode, perplexity of the first 1,024 tokens of WikiText-2 test (one window; not the GPTQ protocol of the main
table), plus 8-bit with --rotate both as a check that the rotated path itself is sound."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def main():
    torch.set_num_threads(1)
    os.environ.setdefault("LLMQ_DATA_DIR", str(SHARED / "data"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmq  # noqa: F401
    from llmq.api import quantize_
    from llmq.eval.perplexity import eval_text
    from llmq.recipe import Recipe

    model_dir = SHARED / "models/smollm2-135m-instruct-q4_1"
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tok(eval_text("wikitext2", os.environ["LLMQ_DATA_DIR"])[:20000], add_special_tokens=False).input_ids[:1024])[None]
    base = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32).eval()

    def ppl(m):
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(m(ids).logits[0, :-1], ids[0, 1:]).exp().item()

    print(f"fp: {ppl(base):.3f}", flush=True)
    for bits, rot in [(8, "both"), (3, "none"), (3, "hadamard"), (3, "residual"), (3, "both")]:
        m = copy.deepcopy(base)
        rows = quantize_(m, Recipe.from_dict({"bits": bits, "group_size": 128, "rotate": rot}))
        werr = sum(r["weight_err"] for r in rows) / len(rows)
        print(f"rtn {bits}-bit g128 rotate={rot}: ppl {ppl(m):.3f}, mean weight err {werr:.4f}", flush=True)
        del m


if __name__ == "__main__":
    main()
