"""Check `llmq export --format compressed-tensors` on the shared SmolLM2 model; writes reports/ct_export.md.

1. (if missing) quantize: llmq quantize MODEL -o LLMQ --bits 4 --group-size 64 --sym --nsamples 16 --seqlen 512
2. export:                 llmq export LLMQ -o DEST --format compressed-tensors
3. a fresh python process that never imports llmq loads DEST with transformers (+ compressed-tensors) and scores
   WikiText-2 with the `llmq eval` protocol (reimplemented there: test rows joined with "\\n\\n", no BOS,
   non-overlapping windows, first --limit windows); it asserts llmq was never imported
4. `llmq eval LLMQ` on the same windows; the max logit difference on the first window
5. compressed-tensors' own writer, from the same integer codes and scales: (a) `pack_to_int32` on the signed codes,
   (b) `apply_quantization_config` + `ModelCompressor.compress_model` on a dense model holding the dequantized
   weights with the scales set, then its state dict and `update_config`, compared tensor by tensor (name,
   dtype, shape, bytes) and config by config with DEST.

llmq's side runs its reference decode (LLMQ_KERNELS=torch), which the export must match bit for bit (the fused CPU
kernels round activations to bf16). --append adds the report as a section of the existing one instead of replacing it.

    python scripts/check_ct_export.py [--llmq out/smollm2-w4g64] [--dest out/smollm2-w4g64-ct] [--limit 8] [--append]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMQ_SHARED", REPO.parent / "shared"))
MODEL = SHARED / "models" / "smollm2-135m-instruct-q4_1"

CHILD = r'''
import json, math, sys, time
import torch, torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(2)
dest, data, seqlen, limit, logits_out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
t0 = time.time()
model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(dest)
with open(f"{data}/wikitext-2-raw/wiki.test.raw", encoding="utf-8", newline="") as f:
    text = "\n\n".join(line if line.strip() else "" for line in f)
ids = torch.tensor(tok(text, add_special_tokens=False).input_ids)
available = ids.numel() // seqlen
windows = ids[: min(limit, available) * seqlen].view(-1, seqlen)
nlls = []
with torch.no_grad():
    for i, w in enumerate(windows):
        logits = model(w[None], use_cache=False).logits.float()
        if i == 0:
            torch.save(logits[0, :256].clone(), logits_out)
        nlls.append(F.cross_entropy(logits[0, :-1], w[1:]).item())
linear = type(model.model.layers[0].self_attn.q_proj)
assert not any(m == "llmq" or m.startswith("llmq.") for m in sys.modules), "llmq was imported"
print(json.dumps({"ppl": math.exp(sum(nlls) / len(nlls)), "windows": len(nlls), "available": available,
                  "q_proj": f"{linear.__module__}.{linear.__name__}", "llmq_imported": False,
                  "quant_method": model.config.quantization_config["quant_method"] if isinstance(model.config.quantization_config, dict)
                  else model.config.quantization_config.quant_method, "seconds": time.time() - t0}))
'''


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(map(str, cmd)), flush=True)
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {r.stderr[-2000:]}")
    return r


def ct_reference(llmq_dir: Path, dest: Path) -> dict:
    """compressed-tensors' own output for the llmq checkpoint's codes and scales, compared with DEST."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    import llmq  # noqa: F401
    from llmq.formats.packing import unpack_bits
    from llmq.modules import LlmqLinear

    qmodel = AutoModelForCausalLM.from_pretrained(llmq_dir, dtype=torch.float32)
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, LlmqLinear)}

    # (a) pack_to_int32 on the signed codes q = u - 2^(b-1)
    pack_equal = 0
    for m in layers.values():
        b = m.layer_config["bits"]
        q = (unpack_bits(m.qweight, b, m.in_features).to(torch.int16) - (1 << (b - 1))).to(torch.int8)
        pack_equal += int(torch.equal(pack_to_int32(q, b), m.qweight))

    # (b) the full compressed-tensors writer on a dense model holding the dequantized weights and our scales
    ours_cfg = json.loads((dest / "config.json").read_text())["quantization_config"]
    qcfg = QuantizationConfig.model_validate({**ours_cfg, "quantization_status": "frozen"})
    hf_cfg = AutoConfig.from_pretrained(dest)
    del hf_cfg.quantization_config
    # in the export's dtype, as compressed-tensors would have saved that model (GGUF sources keep fp16 tensors)
    dense = AutoModelForCausalLM.from_config(hf_cfg, dtype=getattr(torch, json.loads((dest / "config.json").read_text()).get("dtype") or "float32"))
    sd = {k: v for k, v in qmodel.state_dict().items() if k.rpartition(".")[0] not in layers}
    for name, m in layers.items():
        sd[f"{name}.weight"] = m.dequantize()
    missing, unexpected = dense.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("lm_head.weight") for k in missing), (missing[:3], unexpected[:3])
    dense.tie_weights()
    apply_quantization_config(dense, qcfg)
    with torch.no_grad():
        for name, m in layers.items():
            lin = dense.get_submodule(name)
            lin.weight_scale.copy_(m.scales.to(lin.weight_scale.dtype))
            lin.weight_zero_point.zero_()
    compressor = ModelCompressor.from_pretrained_model(dense, quantization_format="pack-quantized")
    compressor.compress_model(dense)
    theirs = {k: v for k, v in dense.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps({}))
        compressor.update_config(tmp)
        their_cfg = json.loads((Path(tmp) / "config.json").read_text())["quantization_config"]

    ours = {}
    for p in sorted(dest.glob("*.safetensors")):
        with safe_open(p, framework="pt") as f:
            ours.update({k: f.get_tensor(k) for k in f.keys()})
    if hf_cfg.tie_word_embeddings:
        theirs.pop("lm_head.weight", None)  # save_pretrained drops the tied head too
    diff = [k for k in sorted(set(ours) | set(theirs))
            if k not in ours or k not in theirs or ours[k].dtype != theirs[k].dtype or ours[k].shape != theirs[k].shape
            or ours[k].contiguous().view(torch.uint8).flatten().tolist() != theirs[k].contiguous().view(torch.uint8).flatten().tolist()]
    cfg_same = QuantizationConfig.model_validate(ours_cfg) == QuantizationConfig.model_validate(their_cfg)
    raw_diff = {k: (ours_cfg.get(k), their_cfg.get(k)) for k in sorted(set(ours_cfg) | set(their_cfg)) if ours_cfg.get(k) != their_cfg.get(k)}
    return {"layers": len(layers), "pack_to_int32_equal": pack_equal, "tensors_ours": len(ours), "tensors_theirs": len(theirs),
            "tensors_differing": diff, "config_equal_parsed": cfg_same, "config_raw_differences": raw_diff,
            "their_config": their_cfg}


def llmq_logits(llmq_dir: Path, data: Path, seqlen: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ["LLMQ_KERNELS"] = "torch"  # the reference decode (see the module docstring)
    import llmq  # noqa: F401
    from llmq.eval.perplexity import eval_text

    model = AutoModelForCausalLM.from_pretrained(llmq_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(llmq_dir)
    ids = torch.tensor(tok(eval_text("wikitext2", str(data)), add_special_tokens=False).input_ids)[:seqlen]
    with torch.no_grad():
        return model(ids[None], use_cache=False).logits[0, :256].float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llmq", type=Path, default=REPO / "out" / "smollm2-w4g64")
    ap.add_argument("--dest", type=Path, default=REPO / "out" / "smollm2-w4g64-ct")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--report", type=Path, default=REPO / "reports" / "ct_export.md")
    ap.add_argument("--made-by", help="the command that made an existing --llmq checkpoint (for the report)")
    ap.add_argument("--append", action="store_true", help="add a section to REPORT instead of replacing it")
    args = ap.parse_args()
    data = SHARED / "data"
    env = {**os.environ, "LLMQ_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1", "LLMQ_KERNELS": "torch"}
    cmds = []
    made = not (args.llmq / "config.json").is_file()
    if not (args.llmq / "config.json").is_file():
        cmd = ["llmq", "quantize", MODEL, "-o", args.llmq, "--bits", "4", "--group-size", "64", "--sym", "--nsamples", "16", "--seqlen", "512"]
        run(cmd, env=env)
        cmds.append(cmd)
    cmd = ["llmq", "export", args.llmq, "-o", args.dest, "--format", "compressed-tensors", "--overwrite"]
    t = time.time()
    exp = run(cmd, env=env)
    cmds.append(cmd)
    export_s = time.time() - t

    with tempfile.TemporaryDirectory() as tmp:
        logits_path = Path(tmp) / "ct_logits.pt"
        child_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        r = run([sys.executable, "-c", CHILD, args.dest, data, args.seqlen, args.limit, logits_path], env=child_env, cwd=tmp)
        child = json.loads(r.stdout.strip().splitlines()[-1])
        import torch

        ct_logits = torch.load(logits_path)
    json_path = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = ["llmq", "eval", args.llmq, "--limit", args.limit, "--seqlen", args.seqlen, "--json", json_path]
    run(cmd, env=env)
    cmds.append(cmd)
    llmq_eval = json.loads(json_path.read_text())[str(args.llmq)]["wikitext2"]
    ours_logits = llmq_logits(args.llmq, data, args.seqlen)
    max_logit_diff = (ours_logits - ct_logits).abs().max().item()
    ref = ct_reference(args.llmq, args.dest)
    qc = json.loads((args.llmq / "config.json").read_text())["quantization_config"]
    recipe, calib = qc.get("recipe"), qc.get("calibration")
    scale_dtype = json.loads((args.dest / "config.json").read_text()).get("dtype", "float32")

    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.glob("*.safetensors"))

    method = f"{recipe['method'].upper()} " if recipe and recipe.get("method") != "rtn" else ""
    ao = " act-order" if recipe and recipe.get("method") == "gptq" and recipe.get("options", {}).get("act_order", True) else ""
    ok = (abs(child["ppl"] - llmq_eval["ppl"]) < 1e-6 * llmq_eval["ppl"] and not ref["tensors_differing"]
          and ref["pack_to_int32_equal"] == ref["layers"] and ref["config_equal_parsed"])
    lines = [
        f"# compressed-tensors export of SmolLM2-135M ({method}4-bit, group 64, symmetric{ao})",
        "",
        f"Produced by `python {shlex.join(sys.argv)}` (`scripts/check_ct_export.py`). Verdict: **{'PASS' if ok else 'FAIL'}**.",
        "",
        "Commands:",
        "",
        "```",
        *[("LLMQ_KERNELS=torch " if c[1] == "eval" else "") + " ".join(map(str, c)) for c in cmds],
        "```",
        "",
        f"The llmq checkpoint's recipe: `{json.dumps(recipe)}`; calibration: `{json.dumps(calib)}`"
        + (" (made by the first command above)." if made else f" (made earlier by `{args.made_by or f'llmq quantize {MODEL} -o {args.llmq} --bits 4 --group-size 64 --sym --nsamples 16 --seqlen 512'}`)."),
        "",
        f"`llmq export` output: {' '.join(exp.stdout.split())} ({export_s:.1f} s)",
        "",
        "## Same perplexity, loaded without llmq",
        "",
        f"WikiText-2 raw test, `llmq eval` protocol (tokenized once, no BOS, non-overlapping windows of {args.seqlen}), "
        f"first {llmq_eval['windows']} of {llmq_eval['windows_available']} windows (`--limit {args.limit}`), fp32, CPU.",
        "",
        "| model | loaded by | linear layers | ppl |",
        "|---|---|---|---:|",
        f"| llmq checkpoint `{args.llmq}` | `llmq eval` (LlmqLinear, torch reference path) | `llmq.modules.LlmqLinear` | {llmq_eval['ppl']:.6f} |",
        f"| exported `{args.dest}` | fresh `python` process, transformers + compressed-tensors, llmq never imported (asserted) | `{child['q_proj']}` | {child['ppl']:.6f} |",
        "",
        f"Max |logit difference| on the first 256 positions of window 1: **{max_logit_diff:.3g}**. "
        f"Checkpoint sizes (safetensors): llmq {size(args.llmq):,} B, compressed-tensors {size(args.dest):,} B; the difference is the "
        f"scales, stored as fp16 by llmq and in the model dtype ({scale_dtype}) by compressed-tensors, plus `weight_shape`.",
        "",
        "## Files equal compressed-tensors' own writer",
        "",
        f"- `pack_to_int32(q, 4)` on the signed codes q = u − 8 equals the stored `qweight` for {ref['pack_to_int32_equal']}/{ref['layers']} layers.",
        f"- `apply_quantization_config` + scales set + `ModelCompressor.from_pretrained_model(model, 'pack-quantized').compress_model()` on a "
        f"dense model holding the dequantized weights: its state dict has {ref['tensors_theirs']} tensors, the export {ref['tensors_ours']}; "
        f"tensors differing in name, dtype, shape or bytes: **{len(ref['tensors_differing'])}**"
        + (f" (e.g. {ref['tensors_differing'][:5]})" if ref["tensors_differing"] else "") + ".",
        f"- `quantization_config` parsed by compressed-tensors' `QuantizationConfig`: equal to `ModelCompressor.update_config`'s: **{ref['config_equal_parsed']}**. "
        f"Raw JSON keys that differ (ours, theirs; an absent key counts as null): `{json.dumps(ref['config_raw_differences'])}`.",
        "",
        "compressed-tensors' own `update_config` output:",
        "",
        "```json",
        json.dumps(ref["their_config"], indent=1, sort_keys=True),
        "```",
        "",
        "Not checked here: serving with vLLM (no GPU and no vLLM install in this environment). The layout and config are",
        "what vLLM's `CompressedTensorsWNA16` reads (see ../shared/research/integration.md §2.3).",
    ]
    args.report.parent.mkdir(parents=True, exist_ok=True)
    if args.append:  # one heading level down, after what is there
        lines = [f"#{l}" if l.startswith("#") else l for l in lines]
        lines = [args.report.read_text().rstrip("\n"), "", *lines]
    args.report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
