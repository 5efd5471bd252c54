"""Why GPTQ without act-order can lose to RTN end to end although its per-layer error is lower: per-layer
output error of v_proj on WikiText-2 text, split into the first token of each window (the attention sink, which
most heads attend to) and the other tokens, for up to three checkpoints of the same fp model.

    python scripts/gptq_sink_diagnosis.py FP_DIR NAME=CKPT [NAME=CKPT ...] [--peer-state PEER_STATE_DICT.pt]

CKPT: an llmq checkpoint (its packed layers are dequantized); --peer-state: a torch state dict of fake-quantized
weights (e.g. llm-compressor's model after `oneshot`). Inputs come from the fp model on 2 windows of 2048 tokens."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmq  # noqa: F401 - registers the llmq quantizer
from llmq.modules import LlmqLinear


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("fp", type=Path)
    ap.add_argument("ckpts", nargs="+", help="NAME=PATH")
    ap.add_argument("--peer-state", type=Path)
    ap.add_argument("--layer", default="v_proj")
    a = ap.parse_args()
    fp = AutoModelForCausalLM.from_pretrained(a.fp, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(a.fp)
    weights = {}
    for spec in a.ckpts:
        name, path = spec.split("=", 1)
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        weights[name] = {n: mod.dequantize() for n, mod in m.named_modules() if isinstance(mod, LlmqLinear)}
    if a.peer_state:
        weights["peer"] = {k[: -len(".weight")]: v for k, v in torch.load(a.peer_state).items() if k.endswith(".weight")}
    text = (Path(os.environ["LLMQ_DATA_DIR"]) / "wikitext-2-raw/wiki.test.raw").read_text()
    ids = tok(text[:200000], return_tensors="pt").input_ids[:, :4096].view(2, 2048)
    xs = {}
    for n, mod in fp.named_modules():
        if n.endswith(a.layer):
            mod.register_forward_hook(lambda m, i, o, n=n: xs.setdefault(n, []).append(i[0][0].detach()))
    with torch.no_grad():
        for b in ids:
            fp(b[None])

    def err(w, q, x):
        return float((x @ (w - q).T).pow(2).sum() / (x @ w.T).pow(2).sum())

    names = list(weights)
    print(f"| layer | " + " | ".join(f"{k} sink" for k in names) + " | " + " | ".join(f"{k} rest" for k in names) + " |")
    print("|---|" + "---:|" * (2 * len(names)))
    mods = dict(fp.named_modules())
    for n, chunks in xs.items():
        x = torch.stack(chunks)
        w = mods[n].weight.detach()
        x0, xr = x[:, 0].reshape(-1, x.shape[-1]), x[:, 1:].reshape(-1, x.shape[-1])
        sink = [f"{err(w, weights[k][n], x0):.4f}" for k in names]
        rest = [f"{err(w, weights[k][n], xr):.4f}" for k in names]
        print(f"| {n} | " + " | ".join(sink) + " | " + " | ".join(rest) + " |")


if __name__ == "__main__":
    main()
