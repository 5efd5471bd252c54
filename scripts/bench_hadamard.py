"""Fast Hadamard transform vs a dense matrix product, on this CPU: the orthogonal transform
(H_m ⊗ H_2^k)/√n of llmq.rotation applied to a batch of vectors, against `x @ T` with the same matrix T
held dense (its construction not timed). Also checks, per size, that the fast transform equals T x and
that T is orthogonal. Writes reports/bench_hadamard.json and .md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from llmq.rotation.hadamard import construction, dense_hadamard, factor, hadamard_transform

REPO = Path(__file__).resolve().parents[1]


def timeit(fn, min_seconds: float = 0.5, min_reps: int = 5) -> dict:
    fn()  # warm-up
    ts, start = [], time.perf_counter()
    while len(ts) < min_reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"min_s": min(ts), "median_s": statistics.median(ts), "reps": len(ts)}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="4096,576,1536,5120,14336")
    ap.add_argument("--batches", default="1,16,256,4096")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--note", default="", help="a sentence added to the report (conditions of the run)")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "bench_hadamard")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for n in map(int, a.sizes.split(",")):
        m, p = factor(n)
        T = dense_hadamard(n, torch.float64)
        ortho_err = float((T @ T.T - torch.eye(n, dtype=torch.float64)).abs().max()) if n <= 4096 else None  # O(n³)
        x64 = torch.randn(8, n, dtype=torch.float64)
        match_err = float((hadamard_transform(x64, m, p) - x64 @ T.T).abs().max())
        Tf = T.to(torch.float32).T.contiguous()  # x @ Tf = (T x) row-wise
        del T
        for b in map(int, a.batches.split(",")):
            if b * n * n > 2**36:  # the dense product would take minutes
                continue
            x = torch.randn(b, n)
            fast = timeit(lambda: hadamard_transform(x, m, p))
            dense = timeit(lambda: x @ Tf)
            rows.append({"n": n, "factor": [m, p], "construction": construction(m), "batch": b,
                         "fast_ms": fast["min_s"] * 1e3, "fast_median_ms": fast["median_s"] * 1e3,
                         "dense_ms": dense["min_s"] * 1e3, "dense_median_ms": dense["median_s"] * 1e3,
                         "speedup": dense["min_s"] / fast["min_s"], "orthogonality_err_fp64": ortho_err,
                         "fast_vs_dense_err_fp64": match_err})
            r = rows[-1]
            print(f"n={n:6d} ({m}x{p}) batch={b:5d}: fast {r['fast_ms']:9.3f} ms  dense {r['dense_ms']:9.3f} ms  "
                  f"speedup {r['speedup']:6.1f}x", flush=True)
        del Tf
    env = {"torch": torch.__version__, "threads": a.threads, "cpu": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    lines = ["# Fast Hadamard transform vs dense matrix product", "",
             "`python scripts/bench_hadamard.py` — the orthogonal transform T = (H_m ⊗ H_2^k)/√n of `llmq.rotation` "
             "applied to `batch` fp32 vectors of size n: the fast path (FWHT on the 2^k part, O(n log n), plus one small "
             "dense H_m product) against `x @ T` with T held dense (building T not timed). Times are the minimum over "
             "repeated runs (median in the JSON). ‖TTᵀ−I‖∞ is computed densely up to n = 4096 (exactness for every size "
             "is a test: the integer factors satisfy H Hᵀ = n I exactly).", "",
             f"Environment: torch {env['torch']}, {a.threads} threads, {env['cpus']} CPUs, load average at the end "
             f"{', '.join(f'{v:.1f}' for v in env['loadavg_at_end'])} (the machine is shared{'; see the note below' if a.note else ''}).", "",
             "| n | m × 2^k | H_m | batch | fast (ms) | dense (ms) | speedup | ‖TTᵀ−I‖∞ (fp64) | ‖fast−dense‖∞ (fp64) |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['factor'][0]} × {r['factor'][1]} | {r['construction']} | {r['batch']} | {r['fast_ms']:.3f} | "
                     f"{r['dense_ms']:.3f} | {r['speedup']:.1f}× | {'–' if r['orthogonality_err_fp64'] is None else format(r['orthogonality_err_fp64'], '.1e')} | {r['fast_vs_dense_err_fp64']:.1e} |")
    if a.note:
        lines += ["", a.note]
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
