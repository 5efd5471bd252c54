"""Per-layer output error ‖(W − Q)X‖²/‖WX‖² of vq (2 and 3 bits, and the algorithm's steps switched off one at a time)
beside GPTQ 2/3-bit g128 on one block of the shared SmolLM2, its Hessians from C4 calibration windows. Prints a
markdown table (and bits per weight from the packed tensors)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def block_hessians(block_idx: int, nsamples: int, seqlen: int):
    from llmq.adapters import adapter_for
    from llmq.blocks import BlockFactory
    from llmq.calib import CalibConfig, calibration_ids
    from llmq.quantize_block import Calibration, collect_hessians
    from llmq.source import ModelSource

    src = ModelSource(str(SHARED / "models/smollm2-135m-instruct-q4_1"))
    adapter = adapter_for(src.config)
    factory = BlockFactory(src.config, adapter)
    ids = calibration_ids(CalibConfig("c4", nsamples, seqlen, 0, str(SHARED / "data")), src.tokenizer())
    hidden = F.embedding(ids, src.tensors.get("model.embed_tokens.weight").float())
    pe = factory.position_embeddings(seqlen)
    from llmq.blocks import forward_block

    for b in range(block_idx + 1):
        pre = f"model.layers.{b}."
        block = factory.block(b, {k[len(pre):]: src.tensors.get(k) for k in src.tensors.keys() if k.startswith(pre)})
        if b < block_idx:
            hidden = forward_block(block, hidden, pe, 4)
    hess = collect_hessians(block, adapter, Calibration(hidden, pe, 4))
    return {n: (block.get_submodule(n).weight.detach().float(), hess[n]) for n in adapter.linears}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--block", type=int, default=0)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from llmq.methods.gptq import gptq_quantize
    from llmq.methods.vq import vq_quantize
    from llmq.quantize_block import packed_bits_per_weight, relative_output_error

    layers = block_hessians(a.block, a.nsamples, a.seqlen)
    runs = {"gptq-w2g128": None, "gptq-w3g128": None, "vq-2bit": dict(dim=4, index_bits=8),
            "vq-2bit no feedback": dict(dim=4, index_bits=8, feedback=False),
            "vq-2bit no update": dict(dim=4, index_bits=8, update=False), "vq-3bit": dict(dim=2, index_bits=6)}
    print(f"block {a.block}, H from C4 {a.nsamples}×{a.seqlen}; cells: output err (bits/weight)\n")
    print("| layer | " + " | ".join(runs) + " |")
    print("|---|" + "---:|" * len(runs))
    secs = {k: 0.0 for k in runs}
    for name, (w, H) in layers.items():
        cells = []
        for key, kw in runs.items():
            t0 = time.time()
            q = gptq_quantize(w, H, int(key[6]), 128, True) if kw is None else vq_quantize(w, H, **kw)
            secs[key] += time.time() - t0
            cells.append(f"{relative_output_error(w, q.dequantize(), H):.4f} ({packed_bits_per_weight(q.pack(), q.layer_config()):.3f})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print("| seconds (1 thread) | " + " | ".join(f"{s:.1f}" for s in secs.values()) + " |")


if __name__ == "__main__":
    sys.exit(main())
