"""Rotation vs no rotation on the shared SmolLM2-135M: WikiText-2 perplexity (GPTQ protocol, ctx 2048,
first --limit windows) of RTN 3-bit g128 and GPTQ 3-bit / 2-bit g128, each with --rotate none, hadamard,
residual and both; plus a check that a rotated checkpoint reloaded in transformers gives the same logits
and perplexity as the same recipe applied in memory. Results accumulate in reports/rotation_smollm2.json
(finished runs are skipped on a re-run, so it can be run piecewise) and are tabulated in .md."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from _bench_common import add_common_args, load_results, ppl, save_report, setup_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CONFIGS = {"rtn-w3g128": ("rtn", 3, 128), "gptq-w3g128": ("gptq", 3, 128), "gptq-w2g128": ("gptq", 2, 128),
           "rtn-w3g128-mse": ("rtn", 3, 128, "--mse-clip")}
ROTATIONS = ["none", "hadamard", "residual", "both"]


def save(results, out: Path):
    save_report(results, out, write_md)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    add_common_args(ap, "/tmp/llmq-rot")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rotations", default=",".join(ROTATIONS))
    ap.add_argument("--skip-reload-check", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads here and in the quantize subprocesses (1 is "
                    "far faster than 2 on a CPU shared with other jobs: no barrier waits on descheduled threads)")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "rotation_smollm2")
    ap.add_argument("--note", default="", help="a paragraph added to the report")
    a = ap.parse_args()
    setup_env(a.threads)
    import llmq  # noqa: F401
    from llmq.loading import load_causal_lm

    jf = a.out.with_suffix(".json")
    proto = {"limit": a.limit, "nsamples": a.nsamples, "seqlen": a.seqlen, "calib": "c4 (GPTQ only; RTN is data-free)"}
    results = load_results(jf, proto, ignore=("threads",))
    if a.note:
        results["note"] = a.note
    a.work.mkdir(parents=True, exist_ok=True)

    if "fp" not in results:
        model, tok, _ = load_causal_lm(str(a.model))
        results["fp"] = ppl(model, tok, a.limit)
        del model
        save(results, a.out)
        print(f"fp: {results['fp']['ppl']:.3f}", flush=True)

    for cname in a.configs.split(","):
        method, bits, gs, *extra = CONFIGS[cname]
        for rot in a.rotations.split(","):
            key = f"{cname}/{rot}"
            if key in results["runs"]:
                continue
            ckpt = a.work / key.replace("/", "-")
            shutil.rmtree(ckpt, ignore_errors=True)
            calib = ["--nsamples", a.nsamples, "--seqlen", a.seqlen] if method == "gptq" else ["--calib", "none"]
            cmd = ["llmq", "quantize", str(a.model), "-o", str(ckpt), "--method", method, "--bits", bits, "--group-size", gs,
                   "--sym", "--rotate", rot, *extra, *calib]
            t0 = time.time()
            p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"{' '.join(map(str, cmd))} failed:\n{p.stderr[-3000:]}")
            qsec = time.time() - t0
            rep = json.loads((ckpt / "llmq_report.json").read_text())
            errs = [r["output_err"] for r in rep["layers"] if r["output_err"] is not None]
            from llmq.inspect_ckpt import inspect_checkpoint

            info = inspect_checkpoint(str(ckpt))
            model, tok, _ = load_causal_lm(str(ckpt))
            r = ppl(model, tok, a.limit)
            del model
            results["runs"][key] = {"threads": a.threads, "method": method, "bits": bits, "group_size": gs, "rotate": rot, "command": " ".join(map(str, cmd)),
                                    "quantize_seconds": qsec, "bpw": info["quantized_bpw"], "total_file_bytes": info["total_file_bytes"],
                                    "mean_layer_output_err": sum(errs) / len(errs) if errs else None,
                                    "mean_layer_weight_err": sum(x["weight_err"] for x in rep["layers"]) / len(rep["layers"]),
                                    "ppl": r}
            save(results, a.out)
            print(f"{key}: ppl {r['ppl']:.3f} (quantize {qsec:.0f} s, {info['quantized_bpw']:.3f} bpw)", flush=True)
            if rot != "none":
                shutil.rmtree(ckpt, ignore_errors=True)  # keep the unrotated ones and the reload-check one only

    if not a.skip_reload_check and "reload_check" not in results:
        results["reload_check"] = reload_check(a)
        save(results, a.out)
    save(results, a.out)


def reload_check(a) -> dict:
    """RTN 3-bit g128 with --rotate both: the checkpoint from `llmq quantize`, loaded by transformers, against
    quantize_ on the model in memory (same recipe): logits and perplexity on the first 2 windows."""
    from transformers import AutoModelForCausalLM

    from llmq.api import quantize_
    from llmq.eval.perplexity import eval_text
    from llmq.loading import load_causal_lm
    from llmq.recipe import Recipe

    ckpt = a.work / "reload-check"
    shutil.rmtree(ckpt, ignore_errors=True)
    cmd = ["llmq", "quantize", str(a.model), "-o", str(ckpt), "--method", "rtn", "--bits", "3", "--group-size", "128", "--sym",
           "--rotate", "both", "--calib", "none"]
    subprocess.run(cmd, check=True, capture_output=True)
    loaded, tok, _ = load_causal_lm(str(ckpt))
    mem = AutoModelForCausalLM.from_pretrained(a.model, gguf_file=next(a.model.glob("*.gguf")).name, dtype=torch.float32).eval()
    quantize_(mem, Recipe.from_dict({"method": "rtn", "bits": 3, "group_size": 128, "sym": True, "rotate": "both"}))
    ids = torch.tensor(tok(eval_text("wikitext2", os.environ["LLMQ_DATA_DIR"])[:20000], add_special_tokens=False).input_ids[:2048])[None]
    with torch.no_grad():
        la, lb = loaded(ids).logits, mem(ids).logits
    out = {"command": " ".join(cmd), "logits_identical": bool(torch.equal(la, lb)), "max_abs_logit_diff": float((la - lb).abs().max()),
           "ppl_loaded_2win": ppl(loaded, tok, 2)["ppl"], "ppl_in_memory_2win": ppl(mem, tok, 2)["ppl"]}
    print(f"reload check: {out}", flush=True)
    return out


def write_md(results: dict, path: Path) -> None:
    pr = results["protocol"]
    fp = results.get("fp", {})
    lines = ["# Rotation on SmolLM2-135M-Instruct (shared Q4_1 GGUF, dequantized)", "",
             f"WikiText-2 raw test, GPTQ protocol, ctx 2048, first **{pr['limit']}** windows "
             f"({fp.get('tokens', '?')} tokens scored), fp32. fp model: **{fp.get('ppl', float('nan')):.3f}**. "
             f"GPTQ calibration: C4, {pr['nsamples']} windows × {pr['seqlen']} tokens, seed 0; RTN runs data-free (`--calib none`). "
             "Symmetric grids, lm_head and embeddings kept unquantized. `python scripts/bench_rotation.py --limit "
             f"{pr['limit']} --nsamples {pr['nsamples']} --seqlen {pr['seqlen']} --threads N` (runs can be split with "
             "`--configs`/`--rotations`; finished ones are kept).", "",
             "| config | rotate | ppl | Δ vs none | bits/weight | checkpoint MB | mean layer output err | mean layer weight err | quantize (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    runs = results.get("runs", {})
    for cname in CONFIGS:
        base = runs.get(f"{cname}/none")
        for rot in ROTATIONS:
            r = runs.get(f"{cname}/{rot}")
            if not r:
                continue
            d = f"{r['ppl']['ppl'] - base['ppl']['ppl']:+.3f}" if base and rot != "none" else ""
            oe = f"{r['mean_layer_output_err']:.4f}" if r["mean_layer_output_err"] is not None else "–"
            lines.append(f"| {cname} | {rot} | {r['ppl']['ppl']:.3f} | {d} | {r['bpw']:.4f} | {r['total_file_bytes'] / 1e6:.1f} | {oe} | {r['mean_layer_weight_err']:.4f} | "
                         f"{r['quantize_seconds']:.0f} |")
    rc = results.get("reload_check")
    if rc:
        lines += ["", f"Reload check (`{rc['command']}`): transformers-loaded checkpoint vs `quantize_` in memory, one 2048-token "
                  f"window: logits identical = **{rc['logits_identical']}** (max |Δ| {rc['max_abs_logit_diff']:.2e}); perplexity on 2 "
                  f"windows {rc['ppl_loaded_2win']:.4f} (loaded) vs {rc['ppl_in_memory_2win']:.4f} (in memory)."]
    if results.get("note"):
        lines += ["", results["note"]]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
