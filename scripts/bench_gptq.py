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


LOCK = ["flock", "/tmp/llmq-heavy.lock"]  # one heavy job at a time on a shared machine


def load() -> float:
    return os.getloadavg()[0]


def timed(cmd, env) -> dict:
    """Run under the shared lock; the wall time is /usr/bin/time's, so waiting for the lock is not counted."""
    p = subprocess.run([*LOCK, "/usr/bin/time", "-v", *map(str, cmd)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", p.stderr).group(1)) for k in ("User", "System"))
    h, m, sec = ([0, 0] + re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", p.stderr).group(1).split(":"))[-3:]
    return {"seconds": 3600 * float(h) + 60 * float(m) + float(sec), "cpu_seconds": cpu, "peak_rss_bytes": rss, "load_after": load()}


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
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--peer-bits", type=int, nargs="*", default=[4, 3], help="bit widths the peer also runs")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--quick", action="store_true", help="only llmq true-sequential, RTN and the peer")
    ap.add_argument("--append", action="store_true", help="add these bit widths' rows to the existing reports/bench_gptq.json")
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


    old = json.loads((REPO / "reports/bench_gptq.json").read_text()) if a.append else None
    results = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, transformers {transformers.__version__}",
               "calibration": f"C4 (llmq.calib c4: validation docs 1100-1999), {a.nsamples} x {a.seqlen} tokens, seed 0, identical windows for every run",
               "fp": old["fp"] if old else ppl_of(fp_dir, tok, a.limit), "runs": [r for r in old["runs"] if r["bits"] not in a.bits] if old else []}

    def llmq_run(key, bits, group, extra, calib=True):
        out = a.work / f"llmq-{key}-w{bits}g{group}"
        args = ["--bits", bits, "--group-size", group, "--sym"]
        args += ["--calib", "c4", "--nsamples", a.nsamples, "--seqlen", a.seqlen, "--seed", 0] if calib else ["--calib", "none"]
        t = timed([sys.executable, "-m", "llmq.cli", "quantize", fp_dir, "-o", out, *args, *extra, "--overwrite"], env)
        r = {**t, **ppl_of(out, tok, a.limit), "command": "llmq quantize MODEL " + " ".join(map(str, args + extra))}
        rep = json.loads((out / "llmq_report.json").read_text())
        if calib:
            r["layers"] = [{k: x[k] for k in ("layer", "output_err", "rtn_output_err")} for x in rep["layers"]]
        shutil.rmtree(out)
        return r

    for bits in a.bits:
        g = a.group_size
        row = {"bits": bits, "group_size": g, "sym": True, "act_order": "static"}
        # llmq's recommended GPTQ (static act-order, one-pass true-sequential; calibration dtype auto = bf16 on
        # this CPU), the same with an fp32 calibration pass, the default block-at-a-time mode, g128, RTN; the
        # peer in its default configuration (static act-order, block at a time) on the fp32 model and on bf16.
        row["llmq_gptq"] = llmq_run("gptq-ts", bits, g, ["--method", "gptq", "--true-sequential"])
        if not a.quick:
            row["llmq_gptq_fp32"] = llmq_run("gptq-ts32", bits, g, ["--method", "gptq", "--true-sequential", "--calib-dtype", "fp32"])
            row["llmq_gptq_block"] = llmq_run("gptq-block", bits, g, ["--method", "gptq"])
            row["llmq_gptq_g128"] = llmq_run("gptq-ts", bits, 128, ["--method", "gptq", "--true-sequential"])
        row["llmq_rtn"] = llmq_run("rtn", bits, g, ["--method", "rtn"], calib=False)
        if not a.skip_peer and bits in a.peer_bits:
            for peer_key, extra in (("llmcompressor_gptq", []), ("llmcompressor_gptq_bf16", ["--bf16"])):
                pj = a.work / f"peer-w{bits}{'-'.join([''] + [e.strip('-') for e in extra])}.json"
                subprocess.run([*LOCK, sys.executable, *map(str, (REPO / "scripts/peer_llmcompressor.py", fp_dir, calib_pt, bits, g, a.limit, pj, *extra))],
                               check=True, env=env, capture_output=True)
                p = json.loads(pj.read_text())
                row[peer_key] = {"seconds": p["quant_seconds"], "cpu_seconds": p.get("cpu_seconds"), "peak_rss_bytes": p["peak_rss_bytes"],
                                 "load_after": p.get("load_after"), "ppl": p["ppl"], "protocol": p["protocol"], "dtype": p.get("dtype")}
            for key in LLMQ_KEYS:
                if key in row:
                    v = row[key]
                    for peer_key in ("llmcompressor_gptq", "llmcompressor_gptq_bf16"):
                        p = row[peer_key]
                        row[f"ratios_{key}_vs_{peer_key}"] = {"ppl": v["ppl"] / p["ppl"], "time": v["seconds"] / p["seconds"],
                                                              "cpu": v["cpu_seconds"] / p["cpu_seconds"], "memory": v["peak_rss_bytes"] / p["peak_rss_bytes"]}
        results["runs"].append(row)
        (REPO / "reports").mkdir(exist_ok=True)
        (REPO / "reports/bench_gptq.json").write_text(json.dumps(results, indent=2))
    write_markdown(results)


NAMES = (("llmq_gptq", "llmq GPTQ, true-sequential, calibration bf16 (default dtype here)"),
         ("llmq_gptq_fp32", "llmq GPTQ, true-sequential, calibration fp32"), ("llmq_gptq_block", "llmq GPTQ, block at a time, bf16"),
         ("llmcompressor_gptq", "llm-compressor GPTQModifier (defaults), fp32 model"),
         ("llmcompressor_gptq_bf16", "llm-compressor GPTQModifier (defaults), bf16 model"),
         ("llmq_gptq_g128", "llmq GPTQ g128, true-sequential, bf16"), ("llmq_rtn", "llmq RTN (no calibration)"))
LLMQ_KEYS = ("llmq_gptq", "llmq_gptq_fp32", "llmq_gptq_block")
PEERS = (("llmcompressor_gptq", "fp32 model"), ("llmcompressor_gptq_bf16", "bf16 model"))


def write_markdown(results):
    lines = ["# GPTQ benchmark: llmq vs llm-compressor", "",
             f"Machine: {results['machine']}. Model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, saved as fp32 safetensors).",
             f"Calibration: {results['calibration']} (RTN rows: none needed).",
             f"Evaluation (all rows, same function): {results['fp']['protocol']}. fp model: **{results['fp']['ppl']:.3f}**.",
             "All GPTQ rows: symmetric grid, static act-order (llm-compressor's default; groups stay `column // group`, so no "
             "inference cost), damping 0.01, block 128. Calibration dtype = the dtype the samples run through the blocks in; "
             "Hessians and the GPTQ math are fp32 in every row (the GPTQ reference code calibrates in fp16 the same way).",
             "Time = whole process wall clock (imports, model load, calibration forward passes, quantization; llmq also writes its "
             "packed checkpoint, the peer only quantizes in memory); CPU = user+system seconds; memory = peak RSS; load = 1-minute "
             "load average at the end of the run (2 cores: above 2 means other work shared the machine). Runs are serialised by a lock, "
             "but other agents' lighter jobs (tests) may have run beside them.", "",
             "| method | bits | group | ppl | time (s) | CPU (s) | peak RSS (GB) | load after |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["runs"]:
        for key, name in NAMES:
            if key in r:
                v = r[key]
                cpu = f"{v['cpu_seconds']:.0f}" if v.get("cpu_seconds") else "-"
                ld = f"{v['load_after']:.1f}" if v.get("load_after") is not None else "-"
                grp = 128 if key.endswith("g128") else r["group_size"]
                lines.append(f"| {name} | {r['bits']} | {grp} | {v['ppl']:.3f} | {v['seconds']:.0f} | {cpu} | {v['peak_rss_bytes'] / 1e9:.2f} | {ld} |")
    lines += ["", "Ratios llmq / llm-compressor (same bits, group, calibration windows, evaluation):", "",
              "| llmq mode | bits | vs peer | ppl | wall time | CPU time | peak memory |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in results["runs"]:
        for key, name in NAMES:
            for peer_key, peer_name in PEERS:
                q = r.get(f"ratios_{key}_vs_{peer_key}")
                if q:
                    lines.append(f"| {name} | {r['bits']} | {peer_name} | {q['ppl']:.3f} | {q['time']:.2f} | {q['cpu']:.2f} | {q['memory']:.2f} |")
    for r in results["runs"]:
        for key in ("llmq_gptq",):
            layers = r.get(key, {}).get("layers", [])
            if not layers:
                continue
            wins = sum(x["output_err"] < x["rtn_output_err"] for x in layers)
            lines += ["", f"## Per-layer output error, {dict(NAMES)[key]}, {r['bits']}-bit g{r['group_size']}: GPTQ below RTN on {wins} of {len(layers)} layers", "",
                      "‖WX − QX‖² / ‖WX‖² on the calibration inputs (as the layer saw them), same grid, same inputs.", "",
                      "| layer | GPTQ | RTN | RTN/GPTQ |", "|---|---:|---:|---:|"]
            lines += [f"| {x['layer']} | {x['output_err']:.3e} | {x['rtn_output_err']:.3e} | {x['rtn_output_err'] / x['output_err']:.1f} |" for x in layers]
    (REPO / "reports/bench_gptq.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:40]))


if __name__ == "__main__":
    main()
