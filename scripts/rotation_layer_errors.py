"""Why rotation can hurt round-to-nearest on SmolLM2: per-layer output error ‖(W−Q)X‖²/‖WX‖² of RTN 3-bit g128,
without and with per-layer Hadamard incoherence, on blocks 0, 3, 10, 20, 29 (C4, 8 windows × 256 tokens), next
to how concentrated the layer's input energy is (max/median of diag H) and how large the weight column reading
the strongest input channel is (its rms over the layer's rms). Writes reports/rotation_layer_errors_smollm2.md."""

from __future__ import annotations

from pathlib import Path

import torch

from llmq.adapters import adapter_for
from llmq.blocks import BlockFactory, forward_block
from llmq.calib import CalibConfig, calibration_ids
from llmq.methods.rtn import rtn_quantize
from llmq.quantize_block import Calibration, collect_hessians, relative_output_error
from llmq.rotation import LayerIncoherence
from llmq.source import ModelSource

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BLOCKS = (0, 3, 10, 20, 29)


def main():
    torch.set_num_threads(1)
    src = ModelSource(str(SHARED / "models/smollm2-135m-instruct-q4_1"))
    ad = adapter_for(src.config)
    fac = BlockFactory(src.config, ad)
    ids = calibration_ids(CalibConfig("c4", 8, 256, 0, str(SHARED / "data")), src.tokenizer())
    hidden = torch.nn.functional.embedding(ids, src.tensors.get("model.embed_tokens.weight").float())
    pe = fac.position_embeddings(256)
    lines = ["# RTN 3-bit g128 layer output error with and without per-layer Hadamard rotation (SmolLM2)", "",
             "`python scripts/rotation_layer_errors.py`: C4 calibration, 8 windows × 256 tokens; output error "
             "‖(W−Q)X‖²/‖WX‖² (the same in either basis). diag H max/median: how much of the input energy sits in one "
             "channel; col rms ratio: rms of the weight column reading that channel over the layer's rms.", "",
             "| block | layer | diag H max/median | col rms ratio | RTN none | RTN hadamard |", "|---:|---|---:|---:|---:|---:|"]
    for i in range(max(BLOCKS) + 1):
        pre = f"model.layers.{i}."
        blk = fac.block(i, {k[len(pre):]: src.tensors.get(k) for k in src.tensors.keys() if k.startswith(pre)})
        if i in BLOCKS:
            hess = collect_hessians(blk, ad, Calibration(hidden, pe, 4))
            for name in ad.linears:
                w, H = blk.get_submodule(name).weight.detach().float(), hess[name]
                d = torch.diag(H)
                inc = LayerIncoherence.for_layer(pre + name, pre + name, w.shape[1], w.shape[0])
                wt, Ht = inc.weight(w), inc.hessian(H)
                e0 = relative_output_error(w, rtn_quantize(w, 3, 128, True).dequantize(), H)
                e1 = relative_output_error(wt, rtn_quantize(wt, 3, 128, True).dequantize(), Ht)
                j = int(d.argmax())
                ratio = float(w[:, j].pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
                lines.append(f"| {i} | {name} | {float(d.max() / d.median()):.0f} | {ratio:.2f} | {e0:.4f} | {e1:.4f} |")
                print(lines[-1], flush=True)
        hidden = forward_block(blk, hidden, pe, 4)
    (REPO / "reports" / "rotation_layer_errors_smollm2.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
