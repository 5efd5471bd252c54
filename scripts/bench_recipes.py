"""The ready-made recipes in recipes/ on the shared SmolLM2-135M: whole-file size, bits per weight, WikiText-2
perplexity (GPTQ protocol, ctx 2048, first --limit windows, with per-window NLLs and their paired difference to the fp
model), KL to the fp model on the same windows, and quantization time. This is the table behind the README's "which
method for which size". llama.cpp's rows are quoted from ../shared/research/peer-baseline.md (same model, data and
protocol, measured on this kind of machine in an earlier session; llama.cpp is not installed here).

    python scripts/bench_recipes.py [--recipes higgs-4bit gptq-4bit-g64 ...] [--limit 8]

Results accumulate in reports/recipes_smollm2.json (finished recipes are skipped on a re-run) and are tabulated in
reports/recipes_smollm2.md."""

from __future__ import annotations

import argparse
import gc
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from _bench_common import add_common_args, heavy_lock, load_results, save_report, setup_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
# llama.cpp on the same model and protocol (../shared/research/peer-baseline.md): whole file MiB, ppl (8 windows)
LLAMA_CPP = {"Q8_0": (136.4, 19.163), "Q4_K_M": (98.9, 20.331), "Q3_K_M": (87.5, 22.159), "Q4_0": (85.8, 24.166),
             "Q2_K": (82.4, 27.374)}


def window_nlls(path: str, limit: int, reference: str) -> tuple[list[float], dict]:
    """Per-window mean NLLs and the KL to the fp model (cached reference log-probs) of one model."""
    import os

    from llmq.eval.kl import kl_divergence
    from llmq.eval.perplexity import eval_text, token_windows
    from llmq.eval.perplexity import window_nlls as nlls_of
    from llmq.loading import load_causal_lm

    model, tok, _ = load_causal_lm(path, torch.float32, seqlen=2048)
    ids = torch.tensor(tok(eval_text("wikitext2", os.environ["LLMQ_DATA_DIR"]), add_special_tokens=False).input_ids)
    windows, _ = token_windows(ids, 2048, None, limit)
    nlls = nlls_of(model, windows)
    kl = kl_divergence(model, tok, reference, "wikitext2", seqlen=2048, limit=limit, data=os.environ["LLMQ_DATA_DIR"],
                       cache_dir=Path("/tmp/llmq-kl-cache")).to_dict()
    del model
    gc.collect()
    return nlls, {k: kl[k] for k in ("kl_mean", "kl_p99", "top1_agree")}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def write_md(results: dict, out: Path) -> None:
    runs, fp = results["runs"], results.get("fp")
    lines = [
        "# Ready-made recipes on SmolLM2-135M-Instruct (shared Q4_1 GGUF, dequantized): size and quality",
        "",
        f"WikiText-2 raw test, GPTQ protocol, ctx 2048, first **{results['protocol']['limit']}** windows, fp32; "
        f"fp model **{fp['ppl']:.3f}**. Calibrated recipes: C4, {results['protocol']['nsamples']} windows × "
        f"{results['protocol']['seqlen']} tokens, seed 0. Whole file = every file of the checkpoint folder "
        "(embeddings and norms kept in fp16, the tied head with them). KL = mean per-token KL(fp ‖ quantized) on the "
        "same windows. Δnll = mean over windows of the paired per-window NLL difference to fp (± its standard error). "
        "`python scripts/bench_recipes.py`.",
        "",
        "| recipe | whole file MiB | bits/weight (linear layers) | ppl | Δnll vs fp | KL | top-1 agree | quantize (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in sorted(runs.items(), key=lambda kv: -kv[1]["file_bytes"]):
        d = [a - b for a, b in zip(r["nlls"], fp["nlls"])]
        mean = sum(d) / len(d)
        se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
        lines.append(f"| `recipes/{name}.yaml` | {r['file_bytes'] / MIB:.1f} | {r['bpw']:.3f} | {r['ppl']:.3f} | "
                     f"{mean:+.4f} ± {se:.4f} | {r['kl']['kl_mean']:.4f} | {100 * r['kl']['top1_agree']:.1f} % | {r['seconds']:.0f} |")
    lines += ["", "llama.cpp on the same model and protocol (quoted from ../shared/research/peer-baseline.md, not re-run here):", "",
              "| llama.cpp type | whole file MiB | ppl |", "|---|---:|---:|"]
    lines += [f"| {k} | {mib:.1f} | {p:.3f} |" for k, (mib, p) in LLAMA_CPP.items()]
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in runs.values()]
    out.write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    add_common_args(ap, "/tmp/llmq-recipes")
    ap.add_argument("--recipes", nargs="*", default=[p.stem for p in sorted((REPO / "recipes").glob("*.yaml"))])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "recipes_smollm2")
    a = ap.parse_args()
    setup_env(a.threads)
    results = load_results(a.out.with_suffix(".json"), {"limit": a.limit, "nsamples": a.nsamples, "seqlen": a.seqlen})
    a.work.mkdir(parents=True, exist_ok=True)
    if "fp" not in results:
        with heavy_lock():
            nlls, _ = window_nlls(str(a.model), a.limit, str(a.model))
        results["fp"] = {"nlls": nlls, "ppl": math.exp(sum(nlls) / len(nlls))}
        save_report(results, a.out, write_md)
    for name in a.recipes:
        if name in results["runs"]:
            continue
        out = a.work / name
        cmd = ["llmq", "quantize", str(a.model), "-o", str(out), "--recipe", f"recipes/{name}.yaml", "--overwrite",
               "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen)]
        with heavy_lock():
            t = time.perf_counter()
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            seconds = time.perf_counter() - t
            if p.returncode:
                sys.exit(f"{name}: {p.stderr[-2000:]}")
            from llmq.inspect_ckpt import inspect_checkpoint

            info = inspect_checkpoint(str(out))
            nlls, kl = window_nlls(str(out), a.limit, str(a.model))
        results["runs"][name] = {"command": " ".join(cmd[:4] + ["OUT"] + cmd[5:]).replace(str(a.model), "SmolLM2"),
                                 "file_bytes": folder_bytes(out), "bpw": info["quantized_bpw"], "nlls": nlls,
                                 "ppl": math.exp(sum(nlls) / len(nlls)), "kl": kl, "seconds": seconds}
        save_report(results, a.out, write_md)
        print(f"{name}: ppl {results['runs'][name]['ppl']:.3f}, {results['runs'][name]['file_bytes'] / MIB:.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
