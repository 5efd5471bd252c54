"""Lookup-table grids on the shared SmolLM2-135M: WikiText-2 perplexity (GPTQ protocol, ctx 2048, first --limit windows)
of HIGGS (data-free: Hadamard rotation + Gaussian MSE-optimal grids, 1-d and 2-d, 4/3/2 bits), NF4 (g64, g128), any4
(calibrated on C4) and the RTN 4-bit symmetric g128 baseline, with bits per weight (codes, scales, tables, sign
vectors) and checkpoint sizes on disk; plus a reload check (a HIGGS checkpoint loaded by transformers against the same
recipe applied in memory). Results accumulate in reports/lut_smollm2.json (finished runs are skipped on a re-run, so
it can be run piecewise with --configs) and are tabulated in reports/lut_smollm2.md.

Each quantize + eval takes the shared heavy-job lock (/tmp/llmq-heavy.lock) for its own duration only (or, with
LLMQ_HEAVY_LOCK_HELD=1 under `flock`, the caller holds it for the whole run)."""

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

from _bench_common import add_common_args, heavy_lock, load_results, ppl, save_report, setup_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# name: (recipe dict, needs calibration)
CONFIGS = {
    "rtn-w4g128": ({"method": "rtn", "bits": 4, "group_size": 128, "sym": True}, False),
    "nf4-g64": ({"method": "nf4", "group_size": 64}, False),
    "nf4-g128": ({"method": "nf4", "group_size": 128}, False),
    "any4-g128": ({"method": "any4", "group_size": 128}, True),
    "higgs-w4g128-d1": ({"method": "higgs", "bits": 4, "group_size": 128}, False),
    "higgs-w4g128-d2": ({"method": "higgs", "bits": 4, "group_size": 128, "options": {"dim": 2}}, False),
    "higgs-w4g128-d1-mse": ({"method": "higgs", "bits": 4, "group_size": 128, "options": {"scale": "mse"}}, False),
    "higgs-w4g128-d2-mse": ({"method": "higgs", "bits": 4, "group_size": 128, "options": {"dim": 2, "scale": "mse"}}, False),
    "higgs-w4g64-d2": ({"method": "higgs", "bits": 4, "group_size": 64, "options": {"dim": 2}}, False),
    "higgs-w4g64-d2-mse": ({"method": "higgs", "bits": 4, "group_size": 64, "options": {"dim": 2, "scale": "mse"}}, False),
    # block-diagonal rotation (the reference implementation's hadamard_size): each 64 inputs rotated on their own
    "higgs-w4g64-d2-h64": ({"method": "higgs", "bits": 4, "group_size": 64, "options": {"dim": 2, "hadamard_size": 64}}, False),
    "higgs-w4g128-d2-h64": ({"method": "higgs", "bits": 4, "group_size": 128, "options": {"dim": 2, "hadamard_size": 64}}, False),
    # column_scale (llmq extension, data-free): each input column divided by its RMS before the rotation, stored
    "higgs-w4g128-d2-cs": ({"method": "higgs", "bits": 4, "group_size": 128, "options": {"dim": 2, "column_scale": True}}, False),
    "higgs-w4g128-d2-mse-cs": ({"method": "higgs", "bits": 4, "group_size": 128,
                                "options": {"dim": 2, "scale": "mse", "column_scale": True}}, False),
    "higgs-w4g64-d2-cs": ({"method": "higgs", "bits": 4, "group_size": 64, "options": {"dim": 2, "column_scale": True}}, False),
    "higgs-w4g64-d2-mse-cs": ({"method": "higgs", "bits": 4, "group_size": 64,
                               "options": {"dim": 2, "scale": "mse", "column_scale": True}}, False),
    "higgs-w3g128-d1": ({"method": "higgs", "bits": 3, "group_size": 128}, False),
    "higgs-w3g128-d2": ({"method": "higgs", "bits": 3, "group_size": 128, "options": {"dim": 2}}, False),
    "higgs-w2g128-d1": ({"method": "higgs", "bits": 2, "group_size": 128}, False),
    "higgs-w2g128-d2": ({"method": "higgs", "bits": 2, "group_size": 128, "options": {"dim": 2}}, False),
    "higgs-w4g128-d1-norot": ({"method": "higgs", "bits": 4, "group_size": 128, "options": {"rotate": False}}, False),
}
DEFAULT = [k for k in CONFIGS if not k.endswith("-norot")]


def save(results, out: Path):
    save_report(results, out, write_md)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    add_common_args(ap, "/tmp/llmq-lut")
    ap.add_argument("--configs", default=",".join(DEFAULT), help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--skip-reload-check", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is far faster than 2 on a CPU shared with other jobs)")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "lut_smollm2")
    a = ap.parse_args()
    setup_env(a.threads)
    import llmq  # noqa: F401
    from llmq.inspect_ckpt import inspect_checkpoint
    from llmq.loading import load_causal_lm

    jf = a.out.with_suffix(".json")
    proto = {"limit": a.limit, "nsamples": a.nsamples, "seqlen": a.seqlen, "calib": "c4 for any4; every other run --calib none"}
    results = load_results(jf, proto, ignore=("threads",))
    a.work.mkdir(parents=True, exist_ok=True)

    if "grid_mse" not in results:
        results["grid_mse"] = grid_mse()
    if "fp" not in results:
        with heavy_lock():
            model, tok, _ = load_causal_lm(str(a.model))
            results["fp"] = ppl(model, tok, a.limit)
        del model
        save(results, a.out)
        print(f"fp: {results['fp']['ppl']:.3f}", flush=True)

    for name in a.configs.split(","):
        if name in results["runs"]:
            continue
        recipe, calib = CONFIGS[name]
        ckpt = a.work / name
        shutil.rmtree(ckpt, ignore_errors=True)
        rfile = a.work / f"{name}.yaml"
        rfile.write_text(json.dumps(recipe))  # JSON is YAML
        cmd = ["llmq", "quantize", str(a.model), "-o", str(ckpt), "--recipe", str(rfile)]
        cmd += ["--nsamples", a.nsamples, "--seqlen", a.seqlen] if calib else ["--calib", "none"]
        with heavy_lock():
            t0 = time.time()
            p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"{' '.join(map(str, cmd))} failed:\n{p.stderr[-3000:]}")
            qsec = time.time() - t0
            model, tok, _ = load_causal_lm(str(ckpt))
            r = ppl(model, tok, a.limit)
            del model
        rep = json.loads((ckpt / "llmq_report.json").read_text())
        info = inspect_checkpoint(str(ckpt))
        errs = [x["output_err"] for x in rep["layers"] if x["output_err"] is not None]
        results["runs"][name] = {"threads": a.threads, "recipe": recipe, "command": " ".join(map(str, cmd)), "quantize_seconds": qsec,
                                 "bpw": info["quantized_bpw"], "quantized_bytes": info["quantized_bytes"],
                                 "total_file_bytes": info["total_file_bytes"],
                                 "mean_layer_weight_err": sum(x["weight_err"] for x in rep["layers"]) / len(rep["layers"]),
                                 "mean_layer_output_err": sum(errs) / len(errs) if errs else None, "ppl": r}
        save(results, a.out)
        print(f"{name}: ppl {r['ppl']:.3f} ({info['quantized_bpw']:.3f} bpw, quantize {qsec:.0f} s)", flush=True)
        shutil.rmtree(ckpt, ignore_errors=True)

    if not a.skip_reload_check and "reload_check" not in results:
        with heavy_lock():
            results["reload_check"] = reload_check(a)
        save(results, a.out)
    save(results, a.out)


def reload_check(a) -> dict:
    """HIGGS 3-bit d=2 g128 (data-free): the checkpoint from `llmq quantize`, loaded by transformers, against quantize_
    on the model in memory with the same recipe: logits on one 2048-token window, perplexity on 2 windows."""
    from transformers import AutoModelForCausalLM

    from llmq.api import quantize_
    from llmq.eval.perplexity import eval_text
    from llmq.loading import load_causal_lm
    from llmq.recipe import Recipe

    recipe = {"method": "higgs", "bits": 3, "group_size": 128, "options": {"dim": 2}}
    ckpt = a.work / "reload-check"
    shutil.rmtree(ckpt, ignore_errors=True)
    rfile = a.work / "reload-check.yaml"
    rfile.write_text(json.dumps(recipe))
    cmd = ["llmq", "quantize", str(a.model), "-o", str(ckpt), "--recipe", str(rfile), "--calib", "none"]
    subprocess.run(cmd, check=True, capture_output=True)
    loaded, tok, _ = load_causal_lm(str(ckpt))
    mem = AutoModelForCausalLM.from_pretrained(a.model, gguf_file=next(a.model.glob("*.gguf")).name, dtype=torch.float32).eval()
    quantize_(mem, Recipe.from_dict(recipe))
    ids = torch.tensor(tok(eval_text("wikitext2", os.environ["LLMQ_DATA_DIR"])[:20000], add_special_tokens=False).input_ids[:2048])[None]
    with torch.no_grad():
        la, lb = loaded(ids).logits, mem(ids).logits
    out = {"command": " ".join(cmd), "recipe": recipe, "logits_identical": bool(torch.equal(la, lb)),
           "max_abs_logit_diff": float((la - lb).abs().max()),
           "ppl_loaded_2win": ppl(loaded, tok, 2)["ppl"], "ppl_in_memory_2win": ppl(mem, tok, 2)["ppl"]}
    shutil.rmtree(ckpt, ignore_errors=True)
    print(f"reload check: {out}", flush=True)
    return out


def grid_mse() -> dict:
    """MSE per weight of each stored (fp16) grid on N(0, 1): exact for 1-d, a fresh 2^20-point sample for 2-d; NF4 too,
    scaled by its best constant (it is meant for absmax-scaled blocks, so this is only a reference)."""
    from llmq.methods.grids import gaussian_grid, gaussian_mse_1d, nearest_2d, nf4_table

    x = torch.randn(1 << 20, 2, generator=torch.Generator().manual_seed(7))
    out = {}
    for b in (2, 3, 4):
        g1 = gaussian_grid(b, 1).half().double()[:, 0]
        g2 = gaussian_grid(b, 2).half().float()
        out[f"{b}-bit"] = {"d1": gaussian_mse_1d(g1), "d2": float(((x - g2[nearest_2d(x, g2)]) ** 2).sum(1).mean()) / 2}
    nf4 = nf4_table().half().double()
    out["4-bit"]["nf4_best_scale"] = min(gaussian_mse_1d(nf4 * s) for s in torch.linspace(1.5, 3.5, 201).tolist())
    return out


def write_md(results: dict, path: Path) -> None:
    pr = results["protocol"]
    fp = results.get("fp", {})
    runs = results.get("runs", {})
    lines = ["# Lookup-table grids on SmolLM2-135M-Instruct (shared Q4_1 GGUF, dequantized): HIGGS, NF4, any4", "",
             f"WikiText-2 raw test, GPTQ protocol, ctx 2048, first **{pr['limit']}** windows ({fp.get('tokens', '?')} tokens scored), "
             f"fp32. fp model: **{fp.get('ppl', float('nan')):.3f}**. Every run but any4 is data-free (`--calib none`); any4 is "
             f"calibrated on C4, {pr['nsamples']} windows × {pr['seqlen']} tokens, seed 0. lm_head and embeddings kept unquantized. "
             "bits/weight = all stored bytes of the quantized layers (codes, fp16 scales, tables, sign vectors, input scales) × 8 / weights; "
             "checkpoint MB = every file of the output folder (the unquantized embeddings dominate: 49152 × 576 in fp32). "
             f"`python scripts/bench_lut.py --limit {pr['limit']} --nsamples {pr['nsamples']} --seqlen {pr['seqlen']} "
             f"--threads N` (speed only).", "",
             "| config | recipe | ppl | bits/weight | quantized layers MB | checkpoint MB | mean layer weight err | mean layer output err | quantize (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in CONFIGS:
        r = runs.get(name)
        if not r:
            continue
        oe = f"{r['mean_layer_output_err']:.4f}" if r["mean_layer_output_err"] is not None else "–"
        lines.append(f"| {name} | `{json.dumps(r['recipe'])}` | {r['ppl']['ppl']:.3f} | {r['bpw']:.4f} | {r['quantized_bytes'] / 1e6:.2f} | "
                     f"{r['total_file_bytes'] / 1e6:.1f} | {r['mean_layer_weight_err']:.4f} | {oe} | {r['quantize_seconds']:.0f} |")
    gm = results.get("grid_mse")
    if gm:
        lines += ["", "Grid MSE per weight on N(0, 1) (the stored fp16 grids; 1-d exact, 2-d on a fresh 2^20-point sample): " +
                  "; ".join(f"{b}: d=1 {v['d1']:.5f}, d=2 {v['d2']:.5f}" for b, v in gm.items()) +
                  (f"; NF4 at its best constant scale {gm['4-bit']['nf4_best_scale']:.5f}" if "nf4_best_scale" in gm.get("4-bit", {}) else "") + "."]
    rc = results.get("reload_check")
    if rc:
        lines += ["", f"Reload check (`{rc['command']}`, recipe `{json.dumps(rc['recipe'])}`): transformers-loaded checkpoint vs "
                  f"`quantize_` in memory, one 2048-token window: logits identical = **{rc['logits_identical']}** (max |Δ| "
                  f"{rc['max_abs_logit_diff']:.2e}); perplexity on 2 windows {rc['ppl_loaded_2win']:.4f} (loaded) vs "
                  f"{rc['ppl_in_memory_2win']:.4f} (in memory)."]
    if results.get("note"):
        lines += ["", results["note"]]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
