"""Checkpoints written by an older llmq still load with identical logits, and this llmq writes checkpoints of the same
size with the same logits.

Two steps, the first with the old code on the path, the second with this tree's:

    git worktree add /tmp/before-k 54de65d
    (cd /tmp/before-k && PYTHONPATH=/tmp/before-k python /path/to/scripts/check_old_checkpoints.py old --work /tmp/oldck)
    python scripts/check_old_checkpoints.py new --work /tmp/oldck --report reports/old_checkpoints.md

`old` quantizes a tiny random Llama (tests/conftest.py `make_tiny_llama`) with each case below and stores the old
code's logits on a fixed input next to each checkpoint. `new` loads each old checkpoint with this code and compares
its logits with the stored ones, then quantizes the same model with this code and compares logits and every file's
size with the old checkpoint (config.json carries the layer configs, so it is listed on its own).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CALIB = ["--nsamples", "4", "--seqlen", "64"]
CASES = {  # name -> (CLI arguments, recipe options or None)
    "rtn": (["--method", "rtn", "--bits", "4", "--group-size", "32", "--calib", "none"], None),
    "rtn-asym": (["--method", "rtn", "--bits", "3", "--group-size", "64", "--asym", "--calib", "none"], None),
    "gptq": (["--method", "gptq", "--bits", "3", "--group-size", "32", *CALIB], None),
    "higgs-colscale": (["--method", "higgs", "--bits", "4", "--calib", "none"], {"column_scale": True}),
    "higgs-block": (["--method", "higgs", "--bits", "4", "--group-size", "32", "--calib", "none"], {"dim": 2, "hadamard_size": 32}),
    "nf4": (["--method", "nf4", "--calib", "none"], None),
    "e8p-rotated": (["--method", "e8p", "--bits", "2", "--rotate", "hadamard", *CALIB], None),
    "vq": (["--method", "vq", "--bits", "2", *CALIB], None),
    "billm": (["--method", "billm", *CALIB], None),
    "pbllm": (["--method", "pbllm", "--group-size", "32", *CALIB], None),
    "ternary": (["--method", "ternary", "--group-size", "64", *CALIB], None),
    "rtn-rotated": (["--method", "rtn", "--bits", "3", "--group-size", "32", "--rotate", "hadamard", "--calib", "none"], None),
    "higgs-rotated": (["--method", "higgs", "--bits", "4", "--group-size", "64", "--rotate", "hadamard", "--calib", "none"],
                      {"column_scale": True}),
}


def tiny_model(work: Path) -> Path:
    folder = work / "tiny"
    if not (folder / "config.json").is_file():
        spec = importlib.util.spec_from_file_location("llmq_test_conftest", REPO / "tests" / "conftest.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.make_tiny_llama(folder)
    return folder


def quantize(model: Path, out: Path, args: list[str], options: dict | None) -> None:
    from typer.testing import CliRunner

    from llmq.cli import app

    extra = []
    if options is not None:
        method = args[args.index("--method") + 1]
        rec = out.parent / f"{out.name}.recipe.json"
        rec.write_text(json.dumps({"method": method, "options": options}))  # JSON is YAML
        extra = ["--recipe", str(rec)]
    r = CliRunner().invoke(app, ["quantize", str(model), "-o", str(out), *args, *extra])
    if r.exit_code != 0:
        raise SystemExit(f"quantize {out.name} failed: {r.output[-2000:]}")


def logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    import llmq  # noqa: F401  (registers the quantizer)

    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits


def sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def tensor_bytes(folder: Path) -> tuple[dict[str, int], int]:
    """Bytes of every tensor of the shards (by name), and the bytes of the shards' headers (JSON: tensor table and the
    layer configs llmq writes into the metadata)."""
    import struct

    tensors, headers = {}, 0
    for p in sorted(folder.glob("*.safetensors")):
        with open(p, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        headers += 8 + n
        for k, v in header.items():
            if k != "__metadata__":
                tensors[k] = v["data_offsets"][1] - v["data_offsets"][0]
    return tensors, headers


def run_old(work: Path) -> None:
    import llmq

    print(f"old llmq from {Path(llmq.__file__).parent}", flush=True)
    model = tiny_model(work)
    for name, (args, options) in CASES.items():
        out = work / "old" / name
        if not (work / "old" / f"{name}.logits.pt").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            quantize(model, out, args, options)
            torch.save(logits(out), work / "old" / f"{name}.logits.pt")
        print(f"old {name} done", flush=True)


def run_new(work: Path, report: Path) -> None:
    import llmq
    from llmq.formats import FORMAT_VERSION

    print(f"new llmq from {Path(llmq.__file__).parent}", flush=True)
    model = work / "tiny"
    rows = []
    for name, (args, options) in CASES.items():
        old = work / "old" / name
        ref = torch.load(work / "old" / f"{name}.logits.pt")
        got_old = logits(old)
        new = work / "new" / name
        if not (new / "config.json").is_file():
            new.parent.mkdir(parents=True, exist_ok=True)
            quantize(model, new, args, options)
        got_new = logits(new)
        so, sn = sizes(old), sizes(new)
        weights_old = sum(v for k, v in so.items() if k.endswith(".safetensors"))
        weights_new = sum(v for k, v in sn.items() if k.endswith(".safetensors"))
        (to, ho), (tn, hn) = tensor_bytes(old), tensor_bytes(new)
        old_version = json.loads((old / "config.json").read_text())["quantization_config"]["format_version"]
        new_version = json.loads((new / "config.json").read_text())["quantization_config"]["format_version"]
        row = {"case": name, "args": " ".join(args), "options": options,
               "old_ckpt_new_code_identical": bool(torch.equal(got_old, ref)),
               "old_ckpt_new_code_max_abs_diff": float((got_old - ref).abs().max()),
               "new_ckpt_identical": bool(torch.equal(got_new, ref)),
               "new_ckpt_max_abs_diff": float((got_new - ref).abs().max()),
               "safetensors_bytes_old": weights_old, "safetensors_bytes_new": weights_new,
               "same_files": sorted(so) == sorted(sn),
               "same_tensors_same_bytes": to == tn, "tensor_bytes_old": sum(to.values()), "tensor_bytes_new": sum(tn.values()),
               "shard_header_bytes_old": ho, "shard_header_bytes_new": hn,
               "config_json_bytes_old": so.get("config.json"), "config_json_bytes_new": sn.get("config.json"),
               # llmq_report.json holds timings (its length varies run to run); the rest are copied files
               "other_files_same_size": all(so[k] == sn.get(k) for k in so if k not in ("config.json", "llmq_report.json")
                                            and not k.endswith(".safetensors")),
               "format_version_old": old_version, "format_version_new": new_version}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.with_suffix(".json").write_text(json.dumps({"format_version": FORMAT_VERSION, "cases": rows}, indent=1) + "\n")
    lines = ["# Old checkpoints load with identical logits; new checkpoints store the same tensor bytes",
             "",
             f"Tiny random Llama (tests/conftest.py `make_tiny_llama`: 3 layers, hidden 96, MLP 160), logits on 2×48 fixed "
             f"random tokens, fp32 on CPU. *old* = written and evaluated by main 54de65d (format_version 1); *new code* = this "
             f"tree (FORMAT_VERSION {FORMAT_VERSION}). Produced by `scripts/check_old_checkpoints.py`.",
             "",
             "Sizes: *tensor bytes* = every tensor's stored bytes (same names in both); *shard headers* = the safetensors "
             "headers (tensor table + the layer configs llmq writes into the metadata), *config.json* holds the layer configs "
             "too: the transform lists of version 2 are longer text than version 1's keys. Other files (tokenizer, "
             "generation config, index) compared too; llmq_report.json holds timings and is left out.",
             "",
             "| case | old ckpt, new code: logits | new ckpt vs old: logits | tensor bytes old / new | shard headers old / new | config.json old / new | other files |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        def eq(same, diff):
            return "identical" if same else f"max abs diff {diff:.3g}"
        lines.append(f"| {r['case']} | {eq(r['old_ckpt_new_code_identical'], r['old_ckpt_new_code_max_abs_diff'])} | "
                     f"{eq(r['new_ckpt_identical'], r['new_ckpt_max_abs_diff'])} | {r['tensor_bytes_old']} / "
                     f"{r['tensor_bytes_new']}{'' if r['same_tensors_same_bytes'] else ' (DIFFER)'} | "
                     f"{r['shard_header_bytes_old']} / {r['shard_header_bytes_new']} | "
                     f"{r['config_json_bytes_old']} / {r['config_json_bytes_new']} | "
                     f"{'same' if r['other_files_same_size'] and r['same_files'] else 'DIFFER'} |")
    lines += ["", "Cases: " + "; ".join(f"`{r['case']}`: `{r['args']}`" + (f" options {json.dumps(r['options'])}" if r["options"] else "")
                                      for r in rows), ""]
    report.write_text("\n".join(lines))
    bad = [r["case"] for r in rows if not (r["old_ckpt_new_code_identical"] and r["new_ckpt_identical"]
                                           and r["same_tensors_same_bytes"] and r["other_files_same_size"])]
    print("FAILED: " + ", ".join(bad) if bad else "all cases identical", flush=True)
    sys.exit(1 if bad else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("side", choices=("old", "new"))
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--report", type=Path, default=REPO / "reports" / "old_checkpoints.md")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a.work.mkdir(parents=True, exist_ok=True)
    run_old(a.work) if a.side == "old" else run_new(a.work, a.report)


if __name__ == "__main__":
    main()
