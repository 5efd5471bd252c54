"""Streaming-memory benchmark: RTN 4-bit g128 of a synthetic 24-block Llama (hidden 2048, MLP 8192,
bf16, ~3.4 GB) under `/usr/bin/time -v`; the goal is peak RSS below a quarter of the model's fp32 size.
Writes reports/bench_streaming.json and .md."""

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

REPO = Path(__file__).resolve().parents[1]


def run_timed(cmd: list[str], env=None) -> dict:
    t0 = time.time()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.time() - t0
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return {"peak_rss_bytes": rss_kb * 1024, "wall_seconds": wall, "stdout": p.stdout}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=Path("/tmp/llmq-synthetic-llama"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/llmq-synthetic-w4g128"))
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    a = ap.parse_args()
    if not (a.model / "config.json").is_file():
        subprocess.run([sys.executable, str(REPO / "scripts/make_synthetic_llama.py"), str(a.model)], check=True)
    cfg = json.loads((a.model / "config.json").read_text())
    h, m, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    params = L * (4 * h * h + 3 * h * m + 2 * h) + 2 * v * h + h
    disk = sum(p.stat().st_size for p in a.model.glob("*.safetensors"))
    shutil.rmtree(a.out, ignore_errors=True)
    cmd = ["llmq", "quantize", str(a.model), "-o", str(a.out), "--bits", "4", "--group-size", "128", "--sym",
           "--calib", "c4", "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen)]
    env = {"LLMQ_DATA_DIR": str(REPO.parent / "shared/data"), "HF_HUB_OFFLINE": "1", **os.environ, "COLUMNS": "140"}
    r = run_timed(cmd, env=env)
    goal = 1.6e9  # the bound (a quarter of the 24-block model's fp32 size, ~6.4 GB)
    result = {
        "model": {"blocks": L, "hidden": h, "mlp": m, "vocab": v, "params": params, "bf16_bytes_on_disk": disk, "fp32_bytes": params * 4},
        "command": " ".join(cmd),
        "peak_rss_bytes": r["peak_rss_bytes"],
        "goal_bytes": goal,
        "passes": r["peak_rss_bytes"] < goal,
        "wall_seconds": round(r["wall_seconds"], 1),
        "output_bytes": sum(p.stat().st_size for p in a.out.iterdir()),
        "machine": f"{os.cpu_count()} CPU cores",
    }
    out_dir = REPO / "reports"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "bench_streaming.json").write_text(json.dumps(result, indent=2))
    md = [
        "# Streaming memory benchmark",
        "",
        f"`{result['command']}` measured with `/usr/bin/time -v` on {result['machine']}.",
        "",
        "| model | params | on disk (bf16) | fp32 size | goal | peak RSS | result | wall time | output |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
        f"| synthetic Llama {L}x(h{h}, mlp{m}), vocab {v} | {params / 1e9:.2f} B | {disk / 1e9:.2f} GB | {params * 4 / 1e9:.2f} GB | "
        f"{goal / 1e9:.2f} GB | {r['peak_rss_bytes'] / 1e9:.2f} GB | {'pass' if result['passes'] else 'FAIL'} | {r['wall_seconds']:.0f} s | "
        f"{result['output_bytes'] / 1e9:.2f} GB |",
        "",
    ]
    (out_dir / "bench_streaming.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
