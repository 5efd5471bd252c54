"""End-to-end check on the shared SmolLM2-135M: RTN 4-bit symmetric g128 with `llmq quantize`, bits per
weight on disk, reload in transformers against the in-memory quantized model, perplexity (--limit 16),
and a SIGKILL halfway through a second run followed by a resume, compared bit for bit.
Writes reports/e2e_smollm2.json and .md."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def llmq(*args, env=None, check=True):
    p = subprocess.run(["llmq", *map(str, args)], capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        sys.exit(f"llmq {' '.join(map(str, args))} failed:\n{p.stderr[-3000:]}")
    return p


def tensors_of(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        with safe_open(p, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=SHARED / "models/smollm2-135m-instruct-q4_1")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmq-e2e"))
    ap.add_argument("--limit", type=int, default=16)
    a = ap.parse_args()
    os.environ.setdefault("LLMQ_DATA_DIR", str(SHARED / "data"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["COLUMNS"] = "160"
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    qargs = ["--bits", 4, "--group-size", 128, "--sym", "--nsamples", 16, "--seqlen", 512, "--seed", 0]
    out = a.work / "w4g128"
    t0 = time.time()
    p = llmq("quantize", a.model, "-o", out, *qargs)
    quant_seconds = time.time() - t0
    summary_table = p.stdout

    info = json.loads((llmq("inspect", out, "--json", a.work / "inspect.json") and (a.work / "inspect.json").read_text()))

    # Reload vs in-memory quantized model.
    import llmq as _llmq  # noqa: F401
    from transformers import AutoModelForCausalLM

    from llmq.api import quantize_
    from llmq.recipe import Recipe

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(a.model, gguf_file=next(a.model.glob("*.gguf")).name, dtype=torch.float32).eval()
    quantize_(ref, Recipe.from_dict({"bits": 4, "group_size": 128, "sym": True}))
    x = torch.randint(0, 49152, (2, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = loaded(x).logits, ref(x).logits
    max_diff = float((la - lb).abs().max())
    del loaded, ref

    # Perplexity, fp and quantized, same protocol.
    ev = llmq("eval", a.model, out, "--limit", a.limit, "--json", a.work / "eval.json")
    evals = json.loads((a.work / "eval.json").read_text())

    # SIGKILL halfway, then resume.
    killed = a.work / "killed"
    partial = a.work / ".killed.partial"
    proc = subprocess.Popen(["llmq", "quantize", str(a.model), "-o", str(killed), *map(str, qargs)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(list(partial.glob("model-*.safetensors"))) < 15 and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards_at_kill = len(list(partial.glob("model-*.safetensors")))
    resumed = llmq("quantize", a.model, "-o", killed, *qargs)
    ta, tb = tensors_of(out), tensors_of(killed)
    identical = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) and ta[k].dtype == tb[k].dtype for k in ta)

    fp_name, q_name = str(a.model), str(out)
    result = {
        "command": f"llmq quantize {a.model} -o {out} " + " ".join(map(str, qargs)),
        "quantize_seconds": round(quant_seconds, 1),
        "quantized_bpw": info["quantized_bpw"],
        "quantized_bytes": info["quantized_bytes"],
        "quantized_weights": info["quantized_weights"],
        "checkpoint_total_bytes": info["total_file_bytes"],
        "unquantized_tensor_bytes": info["unquantized_tensor_bytes"],
        "reload_vs_in_memory_max_abs_logit_diff": max_diff,
        "ppl_fp": evals[fp_name]["wikitext2"],
        "ppl_quantized": evals[q_name]["wikitext2"],
        "kill": {"returncode": proc.returncode, "shards_written_at_kill": shards_at_kill, "of": 31,
                 "resumed_message": "resuming" in resumed.stderr, "bit_identical_to_uninterrupted": identical,
                 "tensors_compared": len(ta)},
    }
    (REPO / "reports").mkdir(exist_ok=True)
    (REPO / "reports/e2e_smollm2.json").write_text(json.dumps(result, indent=2))
    fp, q = result["ppl_fp"], result["ppl_quantized"]
    md = f"""# SmolLM2-135M-Instruct end to end (RTN 4-bit symmetric, group 128)

Source: `../shared/models/smollm2-135m-instruct-q4_1` (Q4_1 GGUF, dequantized to fp32 by transformers).
Note: the source weights already lie on a 4-bit asymmetric g32 grid; symmetric g128 is a different grid,
so this is a real quantization (see the perplexity change).

`{result['command']}` ({result['quantize_seconds']} s on this 2-core CPU, including the GGUF load)

| what | value |
|---|---|
| quantized linear layers on disk (qweight + scales; 210 layers) | {result['quantized_bytes']:,} B for {result['quantized_weights']:,} weights = **{result['quantized_bpw']:.4f} bits/weight** |
| unquantized tensors (embeddings/tied head 49152x576 and norms, fp32 as the GGUF loads) | {result['unquantized_tensor_bytes']:,} B |
| checkpoint total (all files) | {result['checkpoint_total_bytes']:,} B |
| reload with `from_pretrained` vs in-memory `quantize_`: max abs logit difference | **{max_diff}** |

## Perplexity (`llmq eval --limit {a.limit}`)

| model | ppl | protocol |
|---|---:|---|
| fp (Q4_1 dequantized) | {fp['ppl']:.3f} | {fp['protocol']} |
| RTN w4 g128 sym | {q['ppl']:.3f} | {q['protocol']} |

## Kill and resume

A second identical run was killed with SIGKILL (return code {proc.returncode}) after {shards_at_kill} of 31 shards
were written; re-running the same command printed "resuming" = {result['kill']['resumed_message']} and finished.
All {len(ta)} tensors bit-identical to the uninterrupted run: **{identical}**.

## Summary table printed by `llmq quantize`

```
{summary_table.strip()}
```
"""
    (REPO / "reports/e2e_smollm2.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
