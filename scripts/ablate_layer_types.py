"""Which layer types does a data-free recipe lose perplexity on? Quantize only one layer type (q, k, v, o, gate, up
or down projections, in every block) with each recipe, keep everything else in full precision, and measure
WikiText-2 perplexity (ctx 2048, first --limit windows). To first order (the HIGGS paper's linearity theorem) the
model's perplexity increase is the sum of these per-type increases, so the table says where one grid beats another.

    python scripts/ablate_layer_types.py --limit 8 --configs nf4-g64,higgs-w4g128-d2-mse,higgs-w4g128-d2-mse-cs

Quantization goes through llmq.api.quantize_ (the real packed layers, decoded by the torch reference); no data is used
by the recipes named here (lut configs from bench_lut.py). Writes reports/ablate_layer_types.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _bench_common import add_common_args, heavy_lock, load_results, ppl, save_report, setup_env
from bench_lut import CONFIGS

REPO = Path(__file__).resolve().parents[1]
TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    add_common_args(ap, "/tmp/llmq-ablate")
    ap.add_argument("--configs", default="nf4-g64,higgs-w4g128-d2-mse,higgs-w4g128-d2-mse-cs")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "ablate_layer_types")
    a = ap.parse_args()
    setup_env(a.threads)
    from llmq.api import quantize_
    from llmq.loading import load_causal_lm
    from llmq.recipe import Recipe

    results = load_results(a.out.with_suffix(".json"), {"limit": a.limit}, ignore=("threads",))
    if "massive_channels" not in results:
        with heavy_lock():
            results["massive_channels"] = massive_channels(a.model)
        save_report(results, a.out, write_md)
    if "fp" not in results:
        with heavy_lock():
            model, tok, _ = load_causal_lm(str(a.model))
            results["fp"] = ppl(model, tok, a.limit)
        save_report(results, a.out, write_md)
    for name in a.configs.split(","):
        recipe, calib = CONFIGS[name]
        if calib:
            raise SystemExit(f"{name} needs calibration data; this script compares data-free recipes only")
        for t in a.types.split(","):
            key = f"{name}/{t}"
            if key in results["runs"]:
                continue
            with heavy_lock():
                model, tok, _ = load_causal_lm(str(a.model))
                rec = Recipe.from_dict({"method": "none", "overrides": [{"match": rf"\.{t}$", **recipe}]})
                t0 = time.time()
                quantize_(model, rec)
                qsec = time.time() - t0
                r = ppl(model, tok, a.limit)
                del model
            results["runs"][key] = {"config": name, "type": t, "recipe": recipe, "quantize_seconds": qsec, "ppl": r}
            save_report(results, a.out, write_md)
            print(f"{key}: ppl {r['ppl']:.3f} (+{r['ppl'] - results['fp']['ppl']:.3f})", flush=True)


def massive_channels(model_path: Path, top: int = 4) -> dict:
    """Per block: the `top` input channels of v_proj with the largest mean x² on C4 (4 windows x 512 tokens,
    calibration slice), their mean x² / the median channel's, and where their v_proj column norms rank among the
    layer's columns (0 = the smallest). Shows that the weights reading the massive channels are the smallest ones."""
    import torch

    from llmq.calib import CalibConfig, calibration_ids
    from llmq.loading import load_causal_lm

    model, tok, _ = load_causal_lm(str(model_path))
    ids = calibration_ids(CalibConfig("c4", nsamples=4, seqlen=512, seed=0), tok)
    sq = {}
    hooks = [blk.self_attn.v_proj.register_forward_hook(lambda m, inp, out, i=i: sq.__setitem__(i, inp[0].float().square().mean((0, 1))))
             for i, blk in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    out = {}
    for i, blk in enumerate(model.model.layers):
        d = sq[i]
        col = blk.self_attn.v_proj.weight.float().norm(dim=0)
        chans = d.argsort(descending=True)[:top].tolist()
        out[str(i)] = [{"channel": j, "x2_over_median": (d[j] / d.median()).item(),
                        "v_col_norm_rank": (col < col[j]).float().mean().item()} for j in chans]
    return out


def write_md(results: dict, path: Path) -> None:
    fp = results.get("fp", {}).get("ppl", float("nan"))
    runs = results.get("runs", {})
    configs = list(dict.fromkeys(r["config"] for r in runs.values()))
    lines = ["# Perplexity increase when only one layer type is quantized (SmolLM2-135M-Instruct, data-free recipes)", "",
             f"WikiText-2 raw test, ctx 2048, first **{results['protocol']['limit']}** windows, fp32; fp model **{fp:.3f}**. "
             "Each cell: ppl with only that projection type quantized (all 30 blocks), minus the fp ppl; the recipe's "
             "other layers stay in full precision. `python scripts/ablate_layer_types.py --limit "
             f"{results['protocol']['limit']} --configs {','.join(configs)}`.", "",
             "| layer type | " + " | ".join(configs) + " |", "|---|" + "---:|" * len(configs)]
    for t in TYPES:
        cells = [runs.get(f"{c}/{t}") for c in configs]
        if not any(cells):
            continue
        lines.append(f"| {t} | " + " | ".join(f"+{x['ppl']['ppl'] - fp:.3f}" if x else "–" for x in cells) + " |")
    if all(f"{c}/{t}" in runs for c in configs for t in TYPES):  # the first-order prediction for the whole model
        sums = [sum(runs[f"{c}/{t}"]["ppl"]["ppl"] - fp for t in TYPES) for c in configs]
        lines.append("| sum | " + " | ".join(f"+{s:.3f}" for s in sums) + " |")
    lines += ["", "Recipes: " + "; ".join(f"{c} `{json.dumps(CONFIGS[c][0])}`" for c in configs) + "."]
    mc = results.get("massive_channels")
    if mc:
        lines += ["", "The massive-activation input channels of v_proj (C4, 4 windows x 512 tokens) and the rank of their v_proj "
                  "column norms among the layer's 576 columns (0 % = the smallest column):", "",
                  "| block | channel: mean x² / median, column-norm rank |", "|---|---|"]
        for i, rows in mc.items():
            lines.append(f"| {i} | " + "; ".join(f"{r['channel']}: {r['x2_over_median']:.0f}x, {100 * r['v_col_norm_rank']:.1f} %"
                                                 for r in rows) + " |")
    if results.get("note"):
        lines += ["", results["note"]]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
