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


def timed(cmd, env) -> dict:
    t0 = time.time()
    p = subprocess.run(["/usr/bin/time", "-v", *map(str, cmd)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024
    return {"seconds": time.time() - t0, "peak_rss_bytes": rss, "stdout": p.stdout}


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
            t = timed([sys.executable, "-m", "llmq.cli", "quantize", fp_dir, "-o", out, "--method", method, *common, "--overwrite"], env)
            row[f"llmq_{method}"] = {"seconds": t["seconds"], "peak_rss_bytes": t["peak_rss_bytes"], **ppl_of(out, tok, a.limit)}
        if not a.skip_peer:
            pj = a.work / f"peer-w{bits}.json"
            subprocess.run([sys.executable, *map(str, (REPO / "scripts/peer_llmcompressor.py", fp_dir, calib_pt, bits, a.group_size, a.limit, pj))],
                           check=True, env=env, capture_output=True)
            p = json.loads(pj.read_text())
            row["llmcompressor_gptq"] = {"seconds": p["quant_seconds"], "peak_rss_bytes": p["peak_rss_bytes"], "ppl": p["ppl"], "protocol": p["protocol"]}
            row["ratio_ppl"] = row["llmq_gptq"]["ppl"] / p["ppl"]
            row["ratio_time"] = row["llmq_gptq"]["seconds"] / p["quant_seconds"]
            row["ratio_memory"] = row["llmq_gptq"]["peak_rss_bytes"] / p["peak_rss_bytes"]
        results["runs"].append(row)
        (REPO / "reports").mkdir(exist_ok=True)
        (REPO / "reports/bench_gptq.json").write_text(json.dumps(results, indent=2))

    lines = ["# GPTQ benchmark: llmq vs llm-compressor", "",
             f"Machine: {results['machine']}. Model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, saved as fp32 safetensors).",
             f"Calibration: {results['calibration']}.",
             f"Evaluation (all rows, same function): {results['fp']['protocol']}. fp model: **{results['fp']['ppl']:.3f}**.",
             "Time = whole process (imports, model load, calibration forward passes, quantization; llmq also writes its packed checkpoint). Memory = peak RSS.", "",
             "| method | bits | group | ppl | time (s) | peak RSS (GB) |", "|---|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        for key, name in (("llmq_gptq", "llmq GPTQ"), ("llmcompressor_gptq", "llm-compressor GPTQModifier"), ("llmq_rtn", "llmq RTN")):
            if key in r:
                v = r[key]
                lines.append(f"| {name} | {r['bits']} | {r['group_size']} | {v['ppl']:.3f} | {v['seconds']:.0f} | {v['peak_rss_bytes'] / 1e9:.2f} |")
    lines += ["", "| bits | ppl llmq/peer | time llmq/peer | memory llmq/peer |", "|---:|---:|---:|---:|"]
    for r in results["runs"]:
        if "ratio_ppl" in r:
            lines.append(f"| {r['bits']} | {r['ratio_ppl']:.3f} | {r['ratio_time']:.2f} | {r['ratio_memory']:.2f} |")
    (REPO / "reports/bench_gptq.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
