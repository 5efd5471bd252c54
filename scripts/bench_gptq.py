"""GPTQ side by side with a peer on the same machine, model, calibration windows and evaluation.

Runs, for each setting: `llmq quantize --method gptq` (timed with /usr/bin/time -v, whole process) and
llm-compressor's GPTQModifier (scripts/peer_llmcompressor.py: whole process from start to the end of
`oneshot`, peak RSS at that point), both on SmolLM2-135M exported once to an fp32 safetensors folder, both
calibrated on the identical C4 windows (drawn by llmq.calib and handed to the peer as token ids), both
evaluated with llmq's WikiText-2 perplexity function (ctx 2048, --limit windows). Also RTN at the same
grid and the fp model. Run it in an environment that has llmcompressor (it pins transformers <= 5.17):
    python -m venv /tmp/venv-lc && /tmp/venv-lc/bin/pip install torch==2.13.0 llmcompressor gguf typer rich pyarrow \
        && /tmp/venv-lc/bin/pip install --no-deps -e . && /tmp/venv-lc/bin/python scripts/bench_gptq.py
Writes reports/bench_gptq.json and .md."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODEL = SHARED / "models/smollm2-135m-instruct-q4_1"


def load() -> float:
    return os.getloadavg()[0]


def timed(cmd, env) -> dict:
    t0, l0 = time.time(), load()
    p = subprocess.run(["/usr/bin/time", "-v", *map(str, cmd)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", p.stderr).group(1)) for k in ("User", "System"))
    return {"seconds": time.time() - t0, "cpu_seconds": cpu, "peak_rss_bytes": rss, "load_before": l0, "load_after": load()}


def ppl_of(path_or_model, tok, limit) -> dict:
    from transformers import AutoModelForCausalLM

    import llmq  # noqa: F401
    from llmq.eval.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32) if isinstance(path_or_model, (str, Path)) else path_or_model
    r = perplexity(model.eval(), tok, "wikitext2", seqlen=2048, limit=limit)
    return {"ppl": r.ppl, "protocol": r.protocol()}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmq-bench-gptq"))
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--peer-bits", type=int, nargs="*", default=[4, 3], help="bit widths the peer also runs")
    ap.add_argument("--skip-peer", action="store_true")
    a = ap.parse_args()
    env = {**os.environ, "LLMQ_DATA_DIR": str(SHARED / "data"), "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    os.environ.update(env)
    a.work.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmq.calib import CalibConfig, calibration_ids

    fp_dir = a.work / "smollm2-fp32"
    if not (fp_dir / "config.json").is_file():
        from safetensors.torch import save_file

        m = AutoModelForCausalLM.from_pretrained(MODEL, gguf_file=next(MODEL.glob("*.gguf")).name, dtype=torch.float32)
        sd = {k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}  # tied to the embeddings
        fp_dir.mkdir(parents=True)
        save_file(sd, fp_dir / "model.safetensors", metadata={"format": "pt"})
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(MODEL / f, fp_dir / f)
        del m, sd
    tok = AutoTokenizer.from_pretrained(fp_dir)
    calib = CalibConfig("c4", a.nsamples, a.seqlen, 0, str(SHARED / "data"))
    calib_pt = a.work / "calib.pt"
    torch.save(calibration_ids(calib, tok), calib_pt)

    import transformers


    results = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, transformers {transformers.__version__}",
               "calibration": f"C4 (llmq.calib c4: validation docs 1100-1999), {a.nsamples} x {a.seqlen} tokens, seed 0, identical windows for every run",
               "fp": ppl_of(fp_dir, tok, a.limit), "runs": []}
    for bits in a.bits:
        row = {"bits": bits, "group_size": a.group_size, "sym": True, "act_order": False}
        common = ["--bits", bits, "--group-size", a.group_size, "--sym", "--calib", "c4", "--nsamples", a.nsamples, "--seqlen", a.seqlen, "--seed", 0]
        for method in ("gptq", "rtn"):
            out = a.work / f"llmq-{method}-w{bits}g{a.group_size}"
            args = common if method == "gptq" else [*common[:5], "--calib", "none"]  # RTN needs no calibration
            t = timed([sys.executable, "-m", "llmq.cli", "quantize", fp_dir, "-o", out, "--method", method, *args, "--overwrite"], env)
            row[f"llmq_{method}"] = {**t, **ppl_of(out, tok, a.limit)}
            if method == "gptq":
                rep = json.loads((out / "llmq_report.json").read_text())
                row["layers"] = [{k: r[k] for k in ("layer", "output_err", "rtn_output_err")} for r in rep["layers"]]
        if not a.skip_peer and bits in a.peer_bits:
            pj = a.work / f"peer-w{bits}.json"
            l0 = load()
            subprocess.run([sys.executable, *map(str, (REPO / "scripts/peer_llmcompressor.py", fp_dir, calib_pt, bits, a.group_size, a.limit, pj))],
                           check=True, env=env, capture_output=True)
            p = json.loads(pj.read_text())
            row["llmcompressor_gptq"] = {"seconds": p["quant_seconds"], "cpu_seconds": p.get("cpu_seconds"), "peak_rss_bytes": p["peak_rss_bytes"],
                                         "load_before": l0, "load_after": p.get("load_after"), "ppl": p["ppl"], "protocol": p["protocol"]}
            row["ratio_ppl"] = row["llmq_gptq"]["ppl"] / p["ppl"]
            row["ratio_time"] = row["llmq_gptq"]["seconds"] / p["quant_seconds"]
            row["ratio_memory"] = row["llmq_gptq"]["peak_rss_bytes"] / p["peak_rss_bytes"]
            row["ratio_cpu"] = row["llmq_gptq"]["cpu_seconds"] / p["cpu_seconds"]
        results["runs"].append(row)
        (REPO / "reports").mkdir(exist_ok=True)
        (REPO / "reports/bench_gptq.json").write_text(json.dumps(results, indent=2))

    lines = ["# GPTQ benchmark: llmq vs llm-compressor", "",
             f"Machine: {results['machine']}. Model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, saved as fp32 safetensors).",
             f"Calibration: {results['calibration']} (RTN rows: none needed).",
             f"Evaluation (all rows, same function): {results['fp']['protocol']}. fp model: **{results['fp']['ppl']:.3f}**.",
             "Time = whole process wall clock (imports, model load, calibration forward passes, quantization; llmq also writes its "
             "packed checkpoint, the peer only quantizes in memory); CPU = user+system seconds; memory = peak RSS; load = 1-minute "
             "load average before/after (2 cores: above 2 means other work shared the machine).", "",
             "| method | bits | group | act-order | ppl | time (s) | CPU (s) | peak RSS (GB) | load |",
             "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in results["runs"]:
        for key, name in (("llmq_gptq", "llmq GPTQ"), ("llmcompressor_gptq", "llm-compressor GPTQModifier"), ("llmq_rtn", "llmq RTN")):
            if key in r:
                v = r[key]
                cpu = f"{v['cpu_seconds']:.0f}" if v.get("cpu_seconds") else "-"
                ld = f"{v['load_before']:.1f}/{v['load_after']:.1f}" if v.get("load_after") is not None else "-"
                lines.append(f"| {name} | {r['bits']} | {r['group_size']} | {'yes' if r['act_order'] else 'no'} | {v['ppl']:.3f} | "
                             f"{v['seconds']:.0f} | {cpu} | {v['peak_rss_bytes'] / 1e9:.2f} | {ld} |")
    lines += ["", "| bits | ppl llmq/peer | wall time llmq/peer | CPU time llmq/peer | memory llmq/peer |", "|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        if "ratio_ppl" in r:
            lines.append(f"| {r['bits']} | {r['ratio_ppl']:.3f} | {r['ratio_time']:.2f} | {r['ratio_cpu']:.2f} | {r['ratio_memory']:.2f} |")
    for r in results["runs"]:
        layers = r.get("layers", [])
        wins = sum(x["output_err"] < x["rtn_output_err"] for x in layers)
        lines += ["", f"## Per-layer output error, {r['bits']}-bit g{r['group_size']} sym: GPTQ below RTN on {wins} of {len(layers)} layers", "",
                  "‖WX − QX‖² / ‖WX‖² on the calibration inputs, same grid, same inputs.", "",
                  "| layer | GPTQ | RTN | RTN/GPTQ |", "|---|---:|---:|---:|"]
        lines += [f"| {x['layer']} | {x['output_err']:.3e} | {x['rtn_output_err']:.3e} | {x['rtn_output_err'] / x['output_err']:.1f} |" for x in layers]
    (REPO / "reports/bench_gptq.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
