"""Write a synthetic Llama-style checkpoint (random weights, bf16 safetensors, sharded) for memory and
streaming benchmarks. Default: 24 blocks, hidden 2048, MLP 8192, vocab 49152 (~3.4 GB), with SmolLM2's
tokenizer copied in when available so calibration works. Written shard by shard (~1 GB in memory)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--tokenizer-from", type=Path, default=Path(__file__).resolve().parents[2] / "shared/models/smollm2-135m-instruct-q4_1")
    ap.add_argument("--shard-bytes", type=float, default=1e9)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    h, m, g = a.hidden, a.intermediate, torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def tensors():
        yield "model.embed_tokens.weight", rand(a.vocab, h)
        for i in range(a.layers):
            p = f"model.layers.{i}."
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                yield p + f"self_attn.{n}.weight", rand(h, h)
            yield p + "mlp.gate_proj.weight", rand(m, h)
            yield p + "mlp.up_proj.weight", rand(m, h)
            yield p + "mlp.down_proj.weight", rand(h, m)
            yield p + "input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
            yield p + "post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
        yield "model.norm.weight", torch.ones(h, dtype=torch.bfloat16)
        yield "lm_head.weight", rand(a.vocab, h)

    shards, cur, size = [], {}, 0
    for name, t in tensors():
        cur[name] = t
        size += t.numel() * 2
        if size >= a.shard_bytes:
            shards.append(cur)
            save_file(cur, a.out / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
            cur, size = {}, 0
            shards[-1] = list(shards[-1])
    if cur:
        shards.append(list(cur))
        save_file(cur, a.out / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
    n = len(shards)
    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        (a.out / f"part-{i}.safetensors").rename(a.out / final)
        total += (a.out / final).stat().st_size
        weight_map.update({k: final for k in names})
    (a.out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": m,
        "num_hidden_layers": a.layers, "num_attention_heads": a.heads, "num_key_value_heads": a.heads,
        "vocab_size": a.vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }
    (a.out / "config.json").write_text(json.dumps(config, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (a.tokenizer_from / f).is_file():
            shutil.copy(a.tokenizer_from / f, a.out / f)
    print(f"wrote {a.out}: {total / 1e9:.2f} GB in {n} shards")


if __name__ == "__main__":
    main()
