"""CPU decode speed of llmq checkpoints against the fp model (issue 25): greedy generation of --tokens tokens from a
fixed prompt (use_cache=True) on the shared SmolLM2-135M, --threads torch threads. Each model runs in its own
subprocess (peak RSS from resource.getrusage, so one model's memory never counts against another's): load, one
forward (builds the layers' CPU state, llmq.kernels.cpu), a warm-up generation, then --repeats timed generations,
median reported. The machine is shared, so every quantized model is timed between two fp runs and its ratio is to their
mean. Checkpoints are made with `llmq quantize` (data-free where the method allows) and kept under
--work; results accumulate in reports/bench_cpu_decode.json (finished runs are skipped) and reports/bench_cpu_decode.md.

    python scripts/bench_cpu_decode.py [--runs rtn-w4g64,nf4-g64,...] [--threads 2 --tokens 64 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import SHARED, heavy_lock, load_results, save_report, setup_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The history of the printing press begins"
CALIB = ["--nsamples", "8", "--seqlen", "256"]
NOCALIB = ["--calib", "none"]
RUNS = {  # name: (llmq quantize flags, what)
    "rtn-w4g64": (["--method", "rtn", "--bits", "4", "--group-size", "64", "--sym", *NOCALIB], "RTN int 4-bit, g64, symmetric"),
    "gptq-w4g128": (["--method", "gptq", "--bits", "4", "--group-size", "128", "--sym", *CALIB],
                    "GPTQ int 4-bit, g128 (576-wide rows: shorter last group)"),
    "rtn-w8g128": (["--method", "rtn", "--bits", "8", "--group-size", "128", "--sym", *NOCALIB], "RTN int 8-bit, g128"),
    "rtn-w8pc": (["--method", "rtn", "--bits", "8", "--group-size", "0", "--sym", *NOCALIB], "RTN int 8-bit, per channel"),
    "nf4-g64": (["--method", "nf4", *NOCALIB], "NF4 (lut), g64"),
    "higgs-w4": (["--method", "higgs", "--bits", "4", *NOCALIB], "HIGGS 4-bit (lut, input Hadamard)"),
    "e8p-2bit-had": (["--method", "e8p", "--bits", "2", "--rotate", "hadamard", *NOCALIB],
                     "E8P 2-bit + per-layer Hadamard rotation (nearest codeword)"),
    "ternary": (["--method", "ternary", *NOCALIB], "ternary (1.58 bits), absmean"),
}


def measure(path: str, threads: int, tokens: int, repeats: int) -> dict:
    """Runs in the subprocess: one model's load, CPU state, and timed generations."""
    import resource

    setup_env(threads)
    import torch

    from llmq.kernels import cpu
    from llmq.loading import load_causal_lm
    from llmq.modules import LlmqLinear

    t0 = time.perf_counter()
    model, tok, _ = load_causal_lm(path)
    load_s = time.perf_counter() - t0
    ids = tok(PROMPT, return_tensors="pt").input_ids
    gen = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False, "use_cache": True,
           "pad_token_id": tok.eos_token_id}
    with torch.no_grad():
        t0 = time.perf_counter()
        model(ids)  # the first forward builds each layer's CPU state
        first_s = time.perf_counter() - t0
        model.generate(ids, **{**gen, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(ids, **gen)
            times.append(time.perf_counter() - t0)
            assert out.shape[1] - ids.shape[1] == tokens
    paths, state = {}, 0
    for m in model.modules():
        if isinstance(m, LlmqLinear):
            s = m._cpu_state(torch.float32)
            name = {cpu.FusedInt: "fused int4" if getattr(s, "group", None) else "fused int8", cpu.DenseLinear: "cached dense",
                    cpu.Rotated: "fused int4 + Hadamards", type(None): "reference"}[type(s)]
            paths[name] = paths.get(name, 0) + 1
            inner = s.inner if isinstance(s, cpu.Rotated) else s
            state += sum(v.nbytes for k, v in (vars(inner) if inner else {}).items() if torch.is_tensor(v) and k != "bias")
    return {"tokens_per_s": tokens / statistics.median(times), "seconds": times, "load_s": load_s, "first_forward_s": first_s,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_state_bytes": state,
            "paths": paths, "text": tok.decode(out[0, ids.shape[1]:])[:160]}


def run_measure(path: Path, a) -> dict:
    cmd = [sys.executable, __file__, "--measure", str(path), "--threads", str(a.threads), "--tokens", str(a.tokens),
           "--repeats", str(a.repeats)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=SHARED / "models/smollm2-135m-instruct-q4_1")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmq-cpu-decode"))
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "bench_cpu_decode")
    ap.add_argument("--note", help="a remark to keep in the report (e.g. why a format is slower than fp)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure one model in this process
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure, a.threads, a.tokens, a.repeats)))
        return
    setup_env(a.threads)
    proto = {"tokens": a.tokens, "repeats": a.repeats, "threads": a.threads, "prompt": PROMPT, "cpus": os.cpu_count()}
    results = load_results(a.out.with_suffix(".json"), proto)
    if a.note:
        results["note"] = a.note
    a.work.mkdir(parents=True, exist_ok=True)
    last_fp = None
    for key in a.runs.split(","):
        if key in results["runs"]:
            continue
        flags, what = RUNS[key]
        ckpt = a.work / key
        cmd = ["llmq", "quantize", str(a.model), "-o", str(ckpt), *flags]
        with heavy_lock():
            if not (ckpt / "config.json").is_file():
                shutil.rmtree(ckpt, ignore_errors=True)
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
            # fp runs right before and after (the one after is the next run's before): a drift in the shared cores'
            # load between them hits both sides of the ratio alike
            fp = last_fp or run_measure(a.model, a)
            q = run_measure(ckpt, a)
            last_fp = run_measure(a.model, a)
        fp_tps = (fp["tokens_per_s"] + last_fp["tokens_per_s"]) / 2
        results["runs"][key] = {"what": what, "command": " ".join(cmd), "fp_before": fp, "fp_after": last_fp,
                                "fp_tokens_per_s": fp_tps, "quant": q, "ratio": q["tokens_per_s"] / fp_tps,
                                "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))}
        save_report(results, a.out, write_md)
        print(f"{key}: {q['tokens_per_s']:.2f} tok/s vs fp {fp_tps:.2f} ({results['runs'][key]['ratio']:.2f}x), "
              f"peak RSS {q['peak_rss_bytes'] / 1e6:.0f} MB vs {fp['peak_rss_bytes'] / 1e6:.0f} MB", flush=True)
    save_report(results, a.out, write_md)


def write_md(results: dict, path: Path) -> None:
    pr = results["protocol"]
    lines = ["# CPU decode speed: llmq checkpoints vs the fp model (SmolLM2-135M-Instruct, fp32 activations)", "",
             f"Greedy generation of {pr['tokens']} tokens (use_cache=True) from \"{pr['prompt']}\", {pr['threads']} torch "
             f"threads on a {pr['cpus']}-core CPU shared with other jobs; median of {pr['repeats']} runs after a warm-up, each "
             "model in its own process. Each quantized model was timed between two fp runs; fp tok/s is their mean and "
             "the ratio is to it (the fp column varies with the machine's load). Peak RSS: the process's maximum resident "
             "memory (load included; the fp model is a GGUF dequantized to fp32 at load). CPU state: what the quantized layers keep for "
             "CPU forwards beside the packed tensors (fused kernels' repacked codes, or the decoded dense weights); "
             "`llmq.kernels.cpu`. `python scripts/bench_cpu_decode.py`.", "",
             "| run | what | CPU path (layers) | fp tok/s | quantized tok/s | ratio | fp peak RSS MB | quantized peak RSS MB | "
             "CPU state MB | checkpoint MB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in results["runs"].items():
        fp, q = r["fp_before"], r["quant"]
        paths = ", ".join(f"{k} {v}" for k, v in q["paths"].items())
        lines.append(f"| {key} | {r['what']} | {paths} | {r['fp_tokens_per_s']:.2f} | {q['tokens_per_s']:.2f} | "
                     f"**{r['ratio']:.2f}×** | {fp['peak_rss_bytes'] / 1e6:.0f} | {q['peak_rss_bytes'] / 1e6:.0f} | "
                     f"{q['cpu_state_bytes'] / 1e6:.0f} | {r['checkpoint_bytes'] / 1e6:.0f} |")
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in results["runs"].values()]
    if results.get("note"):
        lines += ["", results["note"]]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
