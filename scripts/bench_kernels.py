"""GPU benchmark of the int-format Triton kernels against a plain fp16/bf16 matmul (cuBLAS via F.linear).

    python scripts/bench_kernels.py                      # Llama-7B and 70B layer shapes, batch 1 4 16 64 256, W4 g128
    python scripts/bench_kernels.py --quick              # 8192x8192 only (the issue's acceptance shape)
    python scripts/bench_kernels.py --bits 3 --group-size 64 --asym --act-order
    python scripts/bench_kernels.py --e2e-layers 8       # also: decode tokens/s with transformers generate

Per shape and batch: kernel time of the quantized matmul and of F.linear on the dense weight (same activations),
TFLOP/s, achieved GB/s over the bytes the layer must move (packed codes + scales [+ zeros, g_idx] + x + y; the
dense matmul: fp16 weight + x + y), that as a fraction of the GPU's memory-bandwidth limit, and the speedup.

Timing: each measured call is replayed from a CUDA graph (so Python launch overhead, ~10-20 µs for a Triton launch,
is not counted; the end-to-end numbers do include it), and calls rotate over enough copies of the weights to exceed
the L2 cache several times, so every call reads its weights from HBM (a 4-bit 8192x8192 layer, 33 MB, would
otherwise sit in an H100's 50 MB L2). Autotuning happens in a warm-up call before capture.

End to end: a Llama with the given layer shapes (random weights; speed does not depend on values) in the
activation dtype, against the same model with every decoder linear layer replaced by an LlmqLinear holding random
packed codes; `generate` greedy with min_new_tokens = max_new_tokens, batch 1; tokens/s of the decode phase.

Writes reports/bench_kernels.json and reports/bench_kernels.md (or --out PREFIX). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]

SHAPES = {  # (name, out N, in K)
    "llama-7b": [("q/k/v/o", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008)],
    "llama-70b": [("q/o", 8192, 8192), ("k/v", 1024, 8192), ("gate/up", 28672, 8192), ("down", 8192, 28672)],
}
BATCHES = [1, 4, 16, 64, 256]
PEAK_GBPS = {  # HBM bandwidth from vendor datasheets, GB/s; override with --peak-gbps
    "H100 80GB HBM3": 3350, "H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2039, "H100": 3350, "H200": 4800,
    "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555,
    "L40S": 864, "L4": 300, "RTX 4090": 1008, "A10": 600,
}


def peak_bandwidth(name: str) -> float | None:
    for key, v in sorted(PEAK_GBPS.items(), key=lambda kv: -len(kv[0])):
        if key.lower() in name.lower():
            return float(v)
    return None


def random_layer(n: int, k: int, bits: int, gs: int, sym: bool, act_order: bool, device) -> tuple[dict, dict]:
    """Packed tensors with random contents: every bit pattern decodes to valid codes, so random words suffice."""
    from llmq.formats.intq import n_groups
    from llmq.formats.packing import packed_words

    g = n_groups(k, gs)
    t = {"qweight": torch.randint(-(2**31), 2**31 - 1, (n, packed_words(k, bits)), dtype=torch.int32, device=device),
         "scales": (torch.rand(n, g, device=device) * 0.01 + 0.001).half()}
    if not sym:
        t["qzeros"] = torch.randint(0, 1 << bits, (n, g), dtype=torch.uint8, device=device)
    if act_order:
        t["g_idx"] = (torch.arange(k, device=device) // (gs or k))[torch.randperm(k, device=device)].int()
    cfg = {"format": "int", "bits": bits, "group_size": gs, "sym": sym, "act_order": act_order, "in_features": k, "out_features": n}
    return t, cfg


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def graph_time(fns, reps: int) -> tuple[float, str]:
    """Mean seconds per call, replaying `reps` calls (cycling over fns) from one CUDA graph."""
    if not torch.cuda.is_available():  # --cpu-smoke: the script's logic only, timings meaningless
        fns[0]()
        t = time.perf_counter()
        for i in range(reps):
            fns[i % len(fns)]()
        return (time.perf_counter() - t) / reps, "cpu-eager"
    for f in fns:  # warm-up: compile and autotune outside the capture
        f()
    torch.cuda.synchronize()
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(reps):
                fns[i % len(fns)]()
        g.replay()
        torch.cuda.synchronize()
        runs = []
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            torch.cuda.synchronize()
            runs.append(a.elapsed_time(b) / 1e3 / reps)
        return sorted(runs)[len(runs) // 2], "cuda-graph"
    except Exception as e:  # noqa: BLE001  (fall back to eager timing, and say so)
        print(f"  CUDA graph capture failed ({type(e).__name__}: {e}); timing eagerly", file=sys.stderr)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(reps):
            fns[i % len(fns)]()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / 1e3 / reps, "eager"


def bench_layers(args, dtype, peak) -> list[dict]:
    from llmq.kernels.intq_triton import int_matmul_triton
    from llmq.kernels.reference import dequantize_int

    dev = torch.device("cuda" if not args.cpu_smoke else "cpu")
    props = torch.cuda.get_device_properties(dev) if dev.type == "cuda" else None
    l2 = getattr(props, "L2_cache_size", 50 << 20) if props is not None else 1 << 16
    rows = []
    models = {"llama-70b": [SHAPES["llama-70b"][0]]} if args.quick else SHAPES
    if args.cpu_smoke:
        models = {"tiny": [("smoke", 48, 136)]}
    for model, shapes in models.items():
        for lname, n, k in shapes:
            t0, cfg = random_layer(n, k, args.bits, args.group_size, not args.asym, args.act_order, dev)
            wq_bytes = nbytes(*t0.values())
            copies_q = max(2, -(-3 * l2 // wq_bytes))
            layers = [t0] + [random_layer(n, k, args.bits, args.group_size, not args.asym, args.act_order, dev)[0] for _ in range(copies_q - 1)]
            w0 = dequantize_int(t0, cfg, dtype)
            copies_d = max(2, -(-3 * l2 // nbytes(w0)))
            dense = [w0] + [torch.randn_like(w0) * 0.01 for _ in range(copies_d - 1)]
            for m in args.batches:
                x = torch.randn(m, k, device=dev, dtype=dtype)
                y = int_matmul_triton(x, t0, cfg)
                ref = F.linear(x, w0)
                rel_err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                tq, how_q = graph_time([lambda t=t: int_matmul_triton(x, t, cfg) for t in layers], args.reps)
                td, how_d = graph_time([lambda w=w: F.linear(x, w) for w in dense], args.reps)
                flops = 2 * m * n * k
                io = nbytes(x) + m * n * x.element_size()
                bq, bd = wq_bytes + io, nbytes(w0) + io
                r = {"model": model, "layer": lname, "N": n, "K": k, "batch": m, "bits": args.bits, "group_size": args.group_size,
                     "sym": not args.asym, "act_order": args.act_order, "dtype": str(dtype).replace("torch.", ""),
                     "t_quant_us": tq * 1e6, "t_dense_us": td * 1e6, "speedup": td / tq,
                     "tflops_quant": flops / tq / 1e12, "tflops_dense": flops / td / 1e12,
                     "gbps_quant": bq / tq / 1e9, "gbps_dense": bd / td / 1e9,
                     "bw_frac_quant": (bq / tq / 1e9 / peak) if peak else None, "bw_frac_dense": (bd / td / 1e9 / peak) if peak else None,
                     "bytes_quant": bq, "bytes_dense": bd, "rel_err_vs_dense": rel_err, "timing": f"{how_q}/{how_d}",
                     "weight_copies": [copies_q, copies_d]}
                rows.append(r)
                print(f"{model:9s} {lname:8s} {n:6d}x{k:<6d} M={m:<4d} quant {r['t_quant_us']:9.1f} us {r['gbps_quant']:7.0f} GB/s "
                      f"{r['tflops_quant']:6.1f} TF | dense {r['t_dense_us']:9.1f} us {r['gbps_dense']:7.0f} GB/s {r['tflops_dense']:6.1f} TF "
                      f"| x{r['speedup']:.2f} | err {rel_err:.1e}", flush=True)
            del layers, dense
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def bench_e2e(args, dtype) -> dict:
    """Decode tokens/s of a random-weight Llama, dense vs every decoder linear as LlmqLinear."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import llmq  # noqa: F401
    from llmq.modules import LlmqLinear, set_submodule

    h, inter = args.e2e_hidden, args.e2e_intermediate
    cfg = LlamaConfig(vocab_size=32000, hidden_size=h, intermediate_size=inter, num_hidden_layers=args.e2e_layers,
                      num_attention_heads=h // 128, num_key_value_heads=h // 128 if h <= 4096 else 8, max_position_embeddings=4096)
    torch.manual_seed(0)
    dev = "cpu" if args.cpu_smoke else "cuda"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    ids = torch.randint(0, 32000, (1, args.prompt_len), device=dev)

    def tok_s() -> float:
        gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        model.generate(ids, **{**gen, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up, autotune
        sync()
        t = time.perf_counter()
        prefill = model.generate(ids, **{**gen, "max_new_tokens": 1, "min_new_tokens": 1})
        sync()
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, **gen)
        sync()
        t2 = time.perf_counter() - t
        assert out.shape[1] == ids.shape[1] + args.new_tokens and prefill.shape[1] == ids.shape[1] + 1
        return (args.new_tokens - 1) / (t2 - t1)  # decode phase only: total minus prefill-plus-first-token

    dense = tok_s()
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for n in names:
        lin = model.get_submodule(n)
        t, lcfg = random_layer(lin.out_features, lin.in_features, args.bits, args.group_size, not args.asym, args.act_order, dev)
        set_submodule(model, n, LlmqLinear.from_packed(lcfg, t))
    if dev == "cuda":
        torch.cuda.empty_cache()
    quant = tok_s()
    quant_bytes = sum(b.numel() * b.element_size() for b in list(model.parameters()) + list(model.buffers()))
    return {"layers": args.e2e_layers, "hidden": h, "intermediate": inter, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "dense_tok_s": dense, "quant_tok_s": quant, "speedup": quant / dense, "dense_bytes": dense_bytes, "quant_bytes": quant_bytes}


def markdown(res: dict) -> str:
    lines = [f"# Kernel benchmark: {res['device']}", "",
             f"Command: `{res['command']}`. Weights {res['bits']}-bit, group {res['group_size']}, "
             f"{'symmetric' if res['sym'] else 'asymmetric'}{', act-order' if res['act_order'] else ''}; activations {res['dtype']}; "
             f"memory-bandwidth limit {res['peak_gbps']} GB/s; torch {res['torch']}, triton {res['triton']}. "
             "Times are per call, replayed from CUDA graphs, weights rotated through copies larger than L2.", "",
             "| model | layer | N×K | batch | quant µs | dense µs | speedup | quant TFLOP/s | dense TFLOP/s | quant GB/s | dense GB/s | quant % BW | dense % BW |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    for r in res["layers"]:
        lines.append(f"| {r['model']} | {r['layer']} | {r['N']}×{r['K']} | {r['batch']} | {r['t_quant_us']:.1f} | {r['t_dense_us']:.1f} | "
                     f"{r['speedup']:.2f}× | {r['tflops_quant']:.1f} | {r['tflops_dense']:.1f} | {r['gbps_quant']:.0f} | {r['gbps_dense']:.0f} | "
                     f"{pct(r['bw_frac_quant'])} | {pct(r['bw_frac_dense'])} |")
    lines += ["", "## Acceptance (issue 6, point 2)", ""]
    for c in res["checks"]:
        lines.append(f"- {c['what']}: {c['value']} (target {c['target']}) → **{'met' if c['met'] else 'MISSED'}**")
    if res.get("e2e"):
        e = res["e2e"]
        lines += ["", "## End-to-end decode (transformers generate, batch 1, greedy)", "",
                  f"Random-weight Llama: {e['layers']} layers, hidden {e['hidden']}, MLP {e['intermediate']}; prompt {e['prompt_len']} tokens, "
                  f"{e['new_tokens']} new tokens; decode-phase tokens/s.", "",
                  "| model | weights (bytes) | tokens/s |", "|---|---:|---:|",
                  f"| {res['dtype']} dense | {e['dense_bytes']:,} | {e['dense_tok_s']:.1f} |",
                  f"| llmq {res['bits']}-bit g{res['group_size']} | {e['quant_bytes']:,} | {e['quant_tok_s']:.1f} |",
                  "", f"Speedup {e['speedup']:.2f}×."]
    return "\n".join(lines) + "\n"


def checks(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if (r["N"], r["K"], r["bits"], r["group_size"]) != (8192, 8192, 4, 128) or not r["sym"] or r["act_order"]:
            continue
        if r["batch"] == 1:
            out.append({"what": "4-bit g128 decode, batch 1, 8192×8192: speedup over dense", "value": f"{r['speedup']:.2f}×", "target": "≥ 3×", "met": r["speedup"] >= 3})
            if r["bw_frac_quant"] is not None:
                out.append({"what": "… fraction of the memory-bandwidth limit", "value": f"{100 * r['bw_frac_quant']:.0f}%", "target": "≥ 70%", "met": r["bw_frac_quant"] >= 0.7})
        if r["batch"] == 256:
            ratio = r["t_quant_us"] / r["t_dense_us"]
            out.append({"what": "4-bit g128 prefill, batch 256, 8192×8192: time / dense time", "value": f"{ratio:.2f}", "target": "≤ 1.3", "met": ratio <= 1.3})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    ap.add_argument("--reps", type=int, default=50, help="calls per CUDA graph")
    ap.add_argument("--quick", action="store_true", help="only the 8192x8192 layer")
    ap.add_argument("--peak-gbps", type=float, default=None, help="memory-bandwidth limit (default: from the device name)")
    ap.add_argument("--e2e-layers", type=int, default=0, help="decoder layers of the end-to-end model (0: skip)")
    ap.add_argument("--e2e-hidden", type=int, default=4096)
    ap.add_argument("--e2e-intermediate", type=int, default=11008)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "bench_kernels")
    ap.add_argument("--cpu-smoke", action="store_true", help="run the script's logic on tiny CPU shapes under the Triton "
                    "interpreter (checks the script without a GPU; timings meaningless)")
    args = ap.parse_args()
    if args.cpu_smoke:
        import os

        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        os.environ["LLMQ_KERNELS"] = "triton"
        args.batches, args.reps, args.new_tokens, args.prompt_len = [1, 4, 20], 2, 3, 8
        args.e2e_hidden, args.e2e_intermediate = 128, 256
        args.group_size = min(args.group_size, 64)
    elif not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (none found); the CPU path is the torch reference, see tests/test_kernels.py")
    import triton

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    name = torch.cuda.get_device_name() if not args.cpu_smoke else "cpu (smoke run: Triton interpreter, timings meaningless)"
    peak = args.peak_gbps or peak_bandwidth(name)
    if peak is None:
        print(f"unknown memory bandwidth for {name!r}; pass --peak-gbps to get the fraction", file=sys.stderr)
    rows = bench_layers(args, dtype, peak)
    res = {"device": name, "peak_gbps": peak, "torch": torch.__version__, "triton": triton.__version__,
           "command": "python " + " ".join(sys.argv), "bits": args.bits, "group_size": args.group_size, "sym": not args.asym,
           "act_order": args.act_order, "dtype": args.dtype, "layers": rows, "checks": checks(rows)}
    if args.e2e_layers:
        res["e2e"] = bench_e2e(args, dtype)
        print(json.dumps(res["e2e"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
