"""Same results before and after a refactor: quantize one model with every method using a "before" checkout and the
current code, then compare every tensor of the two checkpoints (bit-identical, or the max absolute difference of
the decoded weights). Writes reports/same_results{suffix}.json and .md.

    git worktree add /tmp/before 54de65d
    python scripts/check_same_results.py --before /tmp/before                      # tiny random Llama, all methods
    python scripts/check_same_results.py --before /tmp/before --model /work/shared/models/smollm2-135m-instruct-q4_1 \\
        --cases e8p vq --ppl --suffix _smollm2 --nsamples 128 --seqlen 2048

Each side runs `python -m llmq.cli quantize` with PYTHONPATH set to its checkout (the "before" checkpoints are kept in
--work and reused). --ppl adds WikiText-2 perplexity (8 windows) of both checkpoints, evaluated with the current code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import make_tiny_llama, tensors_of  # noqa: E402

CALIB = ["--calib", "c4"]
CASES = {  # name: quantize arguments
    "rtn": ["--method", "rtn", "--bits", "4", "--group-size", "32", "--calib", "none"],
    "rtn+hadamard": ["--method", "rtn", "--bits", "3", "--group-size", "32", "--calib", "none", "--rotate", "hadamard"],
    "gptq": ["--method", "gptq", "--bits", "4", "--group-size", "32", *CALIB],
    "gptq-asym-mse-noact": ["--method", "gptq", "--bits", "3", "--group-size", "32", "--asym", "--mse-clip",
                            "--no-act-order", *CALIB],
    "gptq+hadamard": ["--method", "gptq", "--bits", "3", "--group-size", "32", "--rotate", "hadamard", *CALIB],
    "higgs": ["--method", "higgs", "--bits", "3", "--group-size", "32", "--calib", "none"],
    "nf4": ["--method", "nf4", "--group-size", "32", "--calib", "none"],
    "any4": ["--method", "any4", "--group-size", "32", *CALIB],
    "e8p": ["--method", "e8p", "--bits", "2", *CALIB],
    "e8p+hadamard": ["--method", "e8p", "--bits", "3", "--rotate", "hadamard", *CALIB],
    "vq": ["--method", "vq", "--bits", "2", *CALIB],
    "vq+hadamard": ["--method", "vq", "--bits", "3", "--rotate", "hadamard", *CALIB],
    "billm": ["--method", "billm", *CALIB],
    "pbllm": ["--method", "pbllm", "--group-size", "32", *CALIB],
    "ternary": ["--method", "ternary", "--group-size", "32", *CALIB],
}


def run_llmq(checkout: Path, args: list[str], log: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    t = time.time()
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-m", "llmq.cli", *args], cwd=checkout, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode:
        raise SystemExit(f"llmq {' '.join(args)} failed in {checkout} (exit {p.returncode}); see {log}")
    return time.time() - t


def quantize(checkout: Path, model: str, case: str, out: Path, calib_args: list[str]) -> float:
    args = ["quantize", model, "-o", str(out), *CASES[case], "--calib-dtype", "fp32"]
    if "c4" in CASES[case]:
        args += calib_args
    return run_llmq(checkout, args, out.parent / f"{out.name}.log")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def decoded(folder: Path) -> dict:
    from llmq.loading import load_causal_lm
    from llmq.modules import LlmqLinear

    model = load_causal_lm(str(folder))[0]
    return {n: m.dequantize().float() for n, m in model.named_modules() if isinstance(m, LlmqLinear)}


def compare(a: Path, b: Path) -> dict:
    ta, tb = tensors_of(a), tensors_of(b)
    differ = sorted(k for k in ta.keys() | tb.keys() if k not in ta or k not in tb or not same_bits(ta[k], tb[k]))
    row = {"tensors": len(ta), "tensors_differ": len(differ), "identical": not differ, "first_differ": differ[:3]}
    if differ:
        da, db = decoded(a), decoded(b)
        diffs = {n: float((da[n] - db[n]).abs().max()) for n in da}
        row["max_abs_diff"] = max(diffs.values())
        row["max_abs_weight"] = max(float(w.abs().max()) for w in da.values())
        row["layers_differ"] = sum(d > 0 for d in diffs.values())
        row["layers"] = len(diffs)
        row["weights_differ_frac"] = sum(int((da[n] != db[n]).sum()) for n in da) / sum(w.numel() for w in da.values())
    return row


def ppl(folder: Path) -> float:
    js = folder.parent / f"{folder.name}.ppl.json"
    if not js.exists():
        run_llmq(ROOT, ["eval", str(folder), "--tasks", "wikitext2", "--limit", "8", "--json", str(js)],
                 folder.parent / f"{folder.name}.ppl.log")
    data = json.loads(js.read_text())

    def find(x):  # the perplexity value, wherever the results file keeps it
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("ppl", "perplexity", "wikitext2") and isinstance(v, (int, float)):
                    return float(v)
                got = find(v)
                if got is not None:
                    return got
        if isinstance(x, list):
            for v in x:
                got = find(v)
                if got is not None:
                    return got
        return None

    return find(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="checkout of the code before the change")
    ap.add_argument("--model", default="tiny", help="model folder, or 'tiny' (tests/conftest.py's random Llama)")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--work", type=Path, default=Path("/tmp/same_results"))
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--ppl", action="store_true", help="add WikiText-2 perplexity (8 windows) of both checkpoints")
    ap.add_argument("--only-before", action="store_true", help="only make the missing 'before' checkpoints")
    ap.add_argument("--suffix", default="", help="report file suffix, e.g. _smollm2")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    model = a.model
    if model == "tiny":
        model = str(a.work / "tiny-model")
        if not Path(model).exists():
            make_tiny_llama(Path(model))
    calib_args = ["--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen)]
    tag = Path(model).name
    rows = []
    for case in a.cases:
        before, after = a.work / f"{tag}-{case}-before", a.work / f"{tag}-{case}-after"
        t_before = None
        if not before.exists():
            t_before = quantize(a.before.resolve(), model, case, before, calib_args)
        if a.only_before:
            print(case, "before:", t_before, flush=True)
            continue
        if after.exists():
            subprocess.run(["rm", "-rf", str(after)], check=True)
        t_after = quantize(ROOT, model, case, after, calib_args)
        row = {"case": case, "args": CASES[case], **compare(before, after), "seconds_before": t_before, "seconds_after": t_after}
        if a.ppl:
            row["ppl_before"], row["ppl_after"] = ppl(before), ppl(after)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("args", "first_differ")}), flush=True)
    report = {"model": model, "before": str(a.before), "calib": calib_args, "rows": rows}
    out = ROOT / "reports"
    (out / f"same_results{a.suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# Same results before/after ({tag})", "",
             f"Before: checkout `{a.before}`; model `{model}`; calibration c4 {' '.join(calib_args)} (fp32 forward).",
             "Identical: every tensor of the two checkpoints bit-identical. Otherwise: max |Δ| of the decoded weights, "
             "the largest |w| for scale, the share of decoded weights that differ.", "",
             "| case | identical | tensors differ | max abs diff | max abs weight | weights differ |"
             + (" ppl before | ppl after |" if a.ppl else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if a.ppl else "")]
    for r in rows:
        cells = [r["case"], "yes" if r["identical"] else "no", f"{r['tensors_differ']}/{r['tensors']}",
                 f"{r.get('max_abs_diff', 0):.3g}", f"{r.get('max_abs_weight', 0):.3g}" if not r["identical"] else "",
                 f"{100 * r.get('weights_differ_frac', 0):.2f} %"]
        if a.ppl:
            cells += [f"{r['ppl_before']:.3f}", f"{r['ppl_after']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    (out / f"same_results{a.suffix}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
