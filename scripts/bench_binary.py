"""Binary and ternary methods on the shared SmolLM2-135M: WikiText-2 perplexity (GPTQ protocol, ctx 2048, first
--limit windows), stored bits per weight (from the checkpoint's bytes: every tensor of each quantized layer) with a
per-tensor breakdown, and checkpoint sizes, against GPTQ 2-bit g128 on the same protocol. Results accumulate in
reports/binary_smollm2.json (finished runs are skipped on a re-run, so it can be run piecewise) and are tabulated in
reports/binary_smollm2.md."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from _bench_common import add_common_args, breakdown, load_results, ppl, save_report, setup_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CALIB = "calib"  # placeholder expanded to the calibration flags
RUNS = {  # name: (llmq quantize flags, recipe options or None, what it is)
    "gptq-w2g128": (["--method", "gptq", "--bits", "2", "--group-size", "128", "--sym", CALIB], None, "GPTQ 2-bit, group 128"),
    "billm": (["--method", "billm", CALIB], None, "BiLLM, budget 1.3 bits/weight"),
    "ternary-absmean": (["--method", "ternary", "--group-size", "128", "--calib", "none"], None,
                        "ternary, BitNet b1.58 absmean per group of 128, no data"),
    "ternary-gptq": (["--method", "ternary", "--group-size", "128", CALIB], {"refit": False},
                     "ternary absmean thresholds + GPTQ error feedback"),
    "ternary-gptq-refit": (["--method", "ternary", "--group-size", "128", CALIB], None,
                           "ternary + GPTQ feedback + H-weighted scale refit (the default)"),
    "pbllm-10": (["--method", "pbllm", "--group-size", "128", CALIB], None, "PB-LLM, 10% salient weights at 8 bits"),
    "billm-hadamard": (["--method", "billm", "--rotate", "hadamard", CALIB], None, "BiLLM on Hadamard-rotated layers"),
    "ternary-mse-gptq-refit": (["--method", "ternary", "--group-size", "128", CALIB], {"threshold": "mse"},
                               "ternary, MSE-optimal thresholds + GPTQ feedback + refit"),
}


def save(results, out: Path):
    save_report(results, out, write_md)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    add_common_args(ap, "/tmp/llmq-binary")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a CPU shared with other jobs)")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "binary_smollm2")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints under --work")
    a = ap.parse_args()
    setup_env(a.threads)
    import llmq  # noqa: F401
    from llmq.inspect_ckpt import inspect_checkpoint
    from llmq.loading import load_causal_lm

    jf = a.out.with_suffix(".json")
    proto = {"limit": a.limit, "nsamples": a.nsamples, "seqlen": a.seqlen, "calib": "c4, seed 0", "threads": a.threads}
    results = load_results(jf, proto)
    a.work.mkdir(parents=True, exist_ok=True)
    if "fp" not in results:
        model, tok, _ = load_causal_lm(str(a.model))
        results["fp"] = ppl(model, tok, a.limit)
        del model
        save(results, a.out)
        print(f"fp: {results['fp']['ppl']:.3f}", flush=True)

    for key in a.runs.split(","):
        if key in results["runs"]:
            continue
        flags, options, what = RUNS[key]
        ckpt = a.work / key
        shutil.rmtree(ckpt, ignore_errors=True)
        cmd = ["llmq", "quantize", str(a.model), "-o", str(ckpt)]
        for f in flags:
            cmd += ["--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen)] if f == CALIB else [f]
        if options:  # method options go through a recipe (its other fields are the flags above)
            rec = Path(tempfile.mkdtemp()) / f"{key}.yaml"
            rec.write_text(json.dumps({"options": options}))
            cmd += ["--recipe", str(rec)]
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
        qsec = time.time() - t0
        rep = json.loads((ckpt / "llmq_report.json").read_text())
        errs = [r["output_err"] for r in rep["layers"] if r["output_err"] is not None]
        info = inspect_checkpoint(str(ckpt))
        cfgs = json.loads((ckpt / "config.json").read_text())["quantization_config"]["layers"]
        model, tok, _ = load_causal_lm(str(ckpt))
        r = ppl(model, tok, a.limit)
        del model
        results["runs"][key] = {
            "what": what, "command": " ".join(cmd) + (f"   # recipe: {json.dumps({'options': options})}" if options else ""),
            "quantize_seconds": qsec, "bpw": info["quantized_bpw"], "quantized_bytes": info["quantized_bytes"],
            "quantized_weights": info["quantized_weights"], "total_file_bytes": info["total_file_bytes"],
            "unquantized_tensor_bytes": info["unquantized_tensor_bytes"], "bytes_by_tensor": breakdown(ckpt, cfgs),
            "bpw_range": [min(x["bpw"] for x in info["layers"]), max(x["bpw"] for x in info["layers"])],
            "mean_layer_output_err": sum(errs) / len(errs) if errs else None,
            "mean_layer_weight_err": sum(x["weight_err"] for x in rep["layers"]) / len(rep["layers"]),
            "ppl": r}
        save(results, a.out)
        print(f"{key}: ppl {r['ppl']:.3f} (quantize {qsec:.0f} s, {info['quantized_bpw']:.4f} bpw)", flush=True)
        if not a.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
    save(results, a.out)


def write_md(results: dict, path: Path) -> None:
    pr = results["protocol"]
    fp = results.get("fp", {})
    lines = ["# Binary and ternary methods on SmolLM2-135M-Instruct (shared Q4_1 GGUF, dequantized)", "",
             f"WikiText-2 raw test, GPTQ protocol, ctx 2048, first **{pr['limit']}** windows ({fp.get('tokens', '?')} tokens "
             f"scored), fp32. fp model: **{fp.get('ppl', float('nan')):.3f}**. Calibration (all but the data-free row): C4, "
             f"{pr['nsamples']} windows × {pr['seqlen']} tokens, seed 0. lm_head (tied to the embeddings) and embeddings kept "
             f"unquantized. `python scripts/bench_binary.py --limit {pr['limit']} --nsamples {pr['nsamples']} --seqlen {pr['seqlen']}`.",
             "", "Bits/weight = 8 × (bytes of every stored tensor of the quantized linear layers: bit planes, index lists, "
             "scales, placeholders) / their weight count, as `llmq inspect` computes it from the safetensors headers.", "",
             "| run | what | ppl | bits/weight (all layers) | per-layer range | linear-layer MB | checkpoint MB | mean layer output err | quantize (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in results.get("runs", {}).items():
        oe = f"{r['mean_layer_output_err']:.4f}" if r["mean_layer_output_err"] is not None else "–"
        lines.append(f"| {key} | {r['what']} | {r['ppl']['ppl']:.1f} | {r['bpw']:.4f} | {r['bpw_range'][0]:.3f}–{r['bpw_range'][1]:.3f} | "
                     f"{r['quantized_bytes'] / 1e6:.2f} | {r['total_file_bytes'] / 1e6:.1f} | {oe} | {r['quantize_seconds']:.0f} |")
    lines += ["", "Where the bytes go (quantized linear layers only, bits per weight by tensor):", ""]
    for key, r in results.get("runs", {}).items():
        parts = ", ".join(f"{k} {8 * v / r['quantized_weights']:.4f}" for k, v in sorted(r["bytes_by_tensor"].items(), key=lambda kv: -kv[1]))
        lines.append(f"- **{key}**: {parts}")
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in results.get("runs", {}).values()]
    if results.get("note"):
        lines += ["", results["note"]]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
