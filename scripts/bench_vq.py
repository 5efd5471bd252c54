"""Learned vector codebooks (--method vq) on the shared SmolLM2-135M, beside GPTQ 2-bit and 3-bit g128 on the same
protocol: WikiText-2 perplexity (GPTQ protocol, ctx 2048, first --limit windows), stored bits per weight from the
checkpoint's bytes (indices, codebooks, rotation signs: everything each quantized layer stores), file sizes on disk,
quantization wall time. Results accumulate in reports/vq_smollm2.json (finished runs are skipped on a re-run, so it
can be run piecewise: `--runs vq-2bit`) and are tabulated in reports/vq_smollm2.md.

`--import-gptq reports/e8p_smollm2.json` (or reports/rotation_smollm2.json) copies GPTQ rows measured on the identical
protocol by scripts/bench_e8p.py (bench_rotation.py), marked as imported in the table, instead of re-running them."""

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
    "gptq-w3g128": (["--method", "gptq", "--bits", "3", "--group-size", "128", "--sym", CALIB], None, "GPTQ 3-bit, group 128"),
    "vq-2bit": (["--method", "vq", "--bits", "2", CALIB], None, "vq d=4, 256 centroids, one fp16 codebook per layer"),
    "vq-3bit": (["--method", "vq", "--bits", "3", CALIB], None, "vq d=2, 64 centroids, one fp16 codebook per layer"),
    "vq-2bit-hadamard": (["--method", "vq", "--bits", "2", "--rotate", "hadamard", CALIB], None, "vq-2bit on Hadamard-rotated layers"),
    "vq-3bit-hadamard": (["--method", "vq", "--bits", "3", "--rotate", "hadamard", CALIB], None, "vq-3bit on Hadamard-rotated layers"),
}
IMPORT = {"gptq-w2g128": "gptq-w2g128/none", "gptq-w3g128": "gptq-w3g128/none"}  # our name: bench_rotation's


def save(results, out: Path):
    save_report(results, out, write_md)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    add_common_args(ap, "/tmp/llmq-vq")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a CPU shared with other jobs)")
    ap.add_argument("--fp-ppl-from", type=Path, default=None, help="take the fp row from this report json (same protocol) instead of measuring it")
    ap.add_argument("--import-gptq", type=Path, default=None, help="copy the GPTQ rows from this bench_rotation / bench_e8p json (same protocol)")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "vq_smollm2")
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
    same = ("limit", "nsamples", "seqlen")  # the calibration source (C4, seed 0) is the same in bench_rotation
    for src in (a.fp_ppl_from, a.import_gptq):
        if src is not None and any(json.loads(src.read_text())["protocol"].get(k) != proto[k] for k in same):
            sys.exit(f"{src} has a different protocol")
    if "fp" not in results:
        if a.fp_ppl_from is not None:
            results["fp"] = {**json.loads(a.fp_ppl_from.read_text())["fp"], "imported_from": str(a.fp_ppl_from)}
        else:
            model, tok, _ = load_causal_lm(str(a.model))
            results["fp"] = ppl(model, tok, a.limit)
            del model
        save(results, a.out)
        print(f"fp: {results['fp']['ppl']:.3f}", flush=True)
    if a.import_gptq is not None:
        src = json.loads(a.import_gptq.read_text())["runs"]
        for ours, theirs in IMPORT.items():
            theirs = ours if ours in src else theirs  # scripts/bench_e8p.py names them as we do
            if ours not in results["runs"] and theirs in src:
                r = src[theirs]
                results["runs"][ours] = {"what": RUNS[ours][2], "command": r["command"], "imported_from": str(a.import_gptq),
                                         "quantize_seconds": r["quantize_seconds"], "bpw": r["bpw"], "quantized_bytes": None,
                                         "total_file_bytes": r["total_file_bytes"], "bytes_by_tensor": None, "bpw_range": None,
                                         "mean_layer_output_err": r["mean_layer_output_err"],
                                         "mean_layer_weight_err": r["mean_layer_weight_err"], "ppl": r["ppl"]}
        save(results, a.out)

    for key in a.runs.split(","):
        if not key or key in results["runs"]:
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
    lines = ["# Learned vector codebooks (vq) on SmolLM2-135M-Instruct (shared Q4_1 GGUF, dequantized)", "",
             f"WikiText-2 raw test, GPTQ protocol, ctx 2048, first **{pr['limit']}** windows ({fp.get('tokens', '?')} tokens "
             f"scored), fp32. fp model: **{fp.get('ppl', float('nan')):.3f}**. Calibration: C4, {pr['nsamples']} windows × "
             f"{pr['seqlen']} tokens, seed 0. lm_head (tied to the embeddings) and embeddings kept unquantized. "
             f"`python scripts/bench_vq.py --limit {pr['limit']} --nsamples {pr['nsamples']} --seqlen {pr['seqlen']}`.",
             "", "Bits/weight = 8 × (bytes of every stored tensor of the quantized linear layers: packed indices, codebooks, "
             "scales, Hadamard sign vectors, zero-length placeholders) / their weight count, as `llmq inspect` computes it "
             "from the safetensors headers.", "",
             "| run | what | ppl | bits/weight (all layers) | per-layer range | linear-layer MB | checkpoint MB | mean layer output err | quantize (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in results.get("runs", {}).items():
        oe = f"{r['mean_layer_output_err']:.4f}" if r["mean_layer_output_err"] is not None else "–"
        rng = f"{r['bpw_range'][0]:.3f}–{r['bpw_range'][1]:.3f}" if r.get("bpw_range") else "–"
        qb = f"{r['quantized_bytes'] / 1e6:.2f}" if r.get("quantized_bytes") else "–"
        mark = " (imported†)" if r.get("imported_from") else ""
        lines.append(f"| {key}{mark} | {r['what']} | {r['ppl']['ppl']:.2f} | {r['bpw']:.4f} | {rng} | {qb} | "
                     f"{r['total_file_bytes'] / 1e6:.1f} | {oe} | {r['quantize_seconds']:.0f} |")
    if any(r.get("imported_from") for r in results.get("runs", {}).values()) or fp.get("imported_from"):
        src = {r.get("imported_from") for r in results["runs"].values() if r.get("imported_from")} | {fp.get("imported_from")}
        lines += ["", f"† measured earlier on the identical protocol by another bench script ({', '.join(sorted(s for s in src if s))}), "
                  "copied, not re-run here."]
    lines += ["", "Where the bytes go (quantized linear layers only, bits per weight by tensor):", ""]
    for key, r in results.get("runs", {}).items():
        if r.get("bytes_by_tensor"):
            parts = ", ".join(f"{k} {8 * v / r['quantized_weights']:.4f}" for k, v in sorted(r["bytes_by_tensor"].items(), key=lambda kv: -kv[1]))
            lines.append(f"- **{key}**: {parts}")
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in results.get("runs", {}).values()]
    if results.get("note"):
        lines += ["", results["note"]]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
