"""Time the zero-shot suite (`llmq eval MODEL --tasks zeroshot`) on the 135M SmolLM2 model.

    python scripts/bench_zeroshot.py [--limit N] [--threads T] [--tasks zeroshot]

Runs the CLI as a child process and records its wall time, its CPU time (user + system, from
getrusage(RUSAGE_CHILDREN)), and the 1-minute load average before and after: on a shared machine the wall
time is inflated by other jobs, and CPU time / threads is the better estimate of the time on an idle machine.
Writes reports/bench_zeroshot.{json,md} (the CLI's own JSON is reports/bench_zeroshot_results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMQ_SHARED", REPO.parent / "shared"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models/smollm2-135m-instruct-q4_1"))
    ap.add_argument("--tasks", default="zeroshot")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--out", default=str(REPO / "reports/bench_zeroshot"))
    args = ap.parse_args()

    out = Path(args.out)
    results = out.with_name(out.name + "_results.json")
    cmd = ["llmq", "eval", args.model, "--tasks", args.tasks, "--dtype", args.dtype, "--json", str(results)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "LLMQ_DATA_DIR": os.environ.get("LLMQ_DATA_DIR", str(SHARED / "data")),
           "HF_HUB_OFFLINE": "1"}
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"llmq eval failed with exit code {proc.returncode}")
    res = json.loads(results.read_text())[args.model]
    tasks = [t for t in res if isinstance(res[t], dict) and "protocol" in res[t]]
    rec = {
        "command": " ".join(cmd), "threads": args.threads, "limit": args.limit, "wall_s": wall, "cpu_user_s": ru.ru_utime,
        "cpu_sys_s": ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024, "loadavg_before": load0, "loadavg_after": load1,
        "cpu_count": os.cpu_count(),
        "tasks": {t: {"n": res[t]["n"], "n_available": res[t]["n_available"], "requests": res[t]["requests"],
                      "seconds": res[t]["seconds"], **{m: res[t][m] for m in ("acc", "acc_norm", "ppl") if m in res[t]}} for t in tasks},
    }
    out.with_suffix(".json").write_text(json.dumps(rec, indent=2))
    lines = [
        "# Zero-shot suite timing, SmolLM2-135M (fp32, dequantized from the shared GGUF)", "",
        f"Command: `{rec['command']}` with `OMP_NUM_THREADS={args.threads}`; "
        + (f"`--limit {args.limit}` (first {args.limit} items of each task)." if args.limit else "all items of every task."),
        f"Machine: {os.cpu_count()} CPU cores; 1-minute load average {load0[0]:.2f} before, {load1[0]:.2f} after "
        + ("(**shared with other jobs: wall time inflated**)." if max(load0[0], load1[0]) > args.threads + 0.5 else "(otherwise idle)."),
        "", "| task | items | requests | acc | acc_norm | ppl | scoring time (s) |", "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t, r in rec["tasks"].items():
        f = lambda k, pct=True: "-" if k not in r else (f"{100 * r[k]:.2f}" if pct else f"{r[k]:.3f}")  # noqa: E731
        lines.append(f"| {t} | {r['n']}/{r['n_available']} | {r['requests']} | {f('acc')} | {f('acc_norm')} | {f('ppl', False)} | {r['seconds']:.0f} |")
    lines += ["", f"Total wall time (model load included): **{wall / 60:.1f} min**; CPU time {(ru.ru_utime + ru.ru_stime) / 60:.1f} min "
              f"(user {ru.ru_utime:.0f} s, system {ru.ru_stime:.0f} s); peak RSS {rec['peak_rss_mb']:.0f} MB."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
