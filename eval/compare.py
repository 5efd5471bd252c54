"""Side-by-side results of several checkpoints: bits per weight, one markdown table, one PNG plot of quality
against bits per weight with one series per method (the recipe's method of an llmq checkpoint, another
quantizer's quant_method; unquantized and GGUF models are markers of their own).

Bits per weight count the decoder's linear layers only (what quantization methods change; embeddings, the
head and norms excluded), from the bytes actually stored: packed codes + scales + zero points + group
indices for llmq checkpoints, the tensor dtype for safetensors models, the block format (e.g. Q4_1 = 5.0)
for GGUF files.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

# (task, metric, label, higher is better)
COLUMNS = [
    ("wikitext2", "ppl", "wikitext2 ppl", False),
    ("c4", "ppl", "c4 ppl", False),
    ("kl", "kl_mean", "KL mean", False),
    ("kl", "kl_p99", "KL p99", False),
    ("kl", "top1_agree", "top-1 agree", True),
    ("piqa", "acc", "piqa acc", True),
    ("piqa", "acc_norm", "piqa acc_norm", True),
    ("arc_easy", "acc", "arc_e acc", True),
    ("arc_easy", "acc_norm", "arc_e acc_norm", True),
    ("arc_challenge", "acc", "arc_c acc", True),
    ("arc_challenge", "acc_norm", "arc_c acc_norm", True),
    ("boolq", "acc", "boolq acc", True),
    ("winogrande", "acc", "winogrande acc", True),
    ("lambada", "acc", "lambada acc", True),
    ("lambada", "ppl", "lambada ppl", False),
    ("hellaswag", "acc", "hellaswag acc", True),
    ("hellaswag", "acc_norm", "hellaswag acc_norm", True),
]
_SKIP = ("embed", "lm_head", "wte", "wpe", "norm", "token_embd", "output.weight", "output_norm")
_ST_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "I8": 8, "U8": 8}


def _packed_bits(folder: Path) -> int | None:
    """Code width of a compressed-tensors pack-quantized model (its int32 `weight_packed` words hold 32/bits codes)."""
    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    bits = {(g.get("weights") or {}).get("num_bits") for g in (qc.get("config_groups") or {}).values()}
    return bits.pop() if qc.get("format") == "pack-quantized" and len(bits) == 1 else None


def _linear_bpw_safetensors(folder: Path) -> float | None:
    bits = elems = 0
    packed = _packed_bits(folder)
    for p in sorted(folder.glob("*.safetensors")):
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, v in header.items():
            if name == "__metadata__" or len(v["shape"]) != 2 or any(s in name for s in _SKIP):
                continue
            e = v["shape"][0] * v["shape"][1]
            if packed and name.endswith(".weight_packed") and v["dtype"] == "I32":
                bits, elems = bits + 32 * e, elems + 32 * e // packed
            elif v["dtype"] not in _ST_BITS:
                continue
            elif packed and name.endswith((".weight_scale", ".weight_zero_point")):
                bits += e * _ST_BITS[v["dtype"]]  # stored bytes of a quantized layer, no weights of their own
            else:
                bits, elems = bits + e * _ST_BITS[v["dtype"]], elems + e
    return bits / elems if elems else None


def _linear_bpw_gguf(path: Path) -> float | None:
    import gguf

    r = gguf.GGUFReader(str(path))
    bits = elems = 0
    for t in r.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            bits, elems = bits + 8 * int(t.n_bytes), elems + int(t.n_elements)
    return bits / elems if elems else None


def bits_per_weight(model: str) -> float | None:
    """Decoder linear-layer bits per weight of a model path, or None when it cannot be told (hub id)."""
    from llmq.inspect_ckpt import inspect_checkpoint
    from llmq.loading import is_llmq_checkpoint

    p = Path(model)
    try:
        if p.is_file() and p.suffix == ".gguf":
            return _linear_bpw_gguf(p)
        if not p.is_dir():
            return None
        if is_llmq_checkpoint(p):
            return inspect_checkpoint(str(p))["quantized_bpw"]
        if any(p.glob("*.safetensors")):
            return _linear_bpw_safetensors(p)
        ggufs = sorted(p.glob("*.gguf"))
        return _linear_bpw_gguf(ggufs[0]) if len(ggufs) == 1 else None
    except Exception:  # noqa: BLE001  (a missing bpw only removes the point from the plot)
        return None


FP = "fp"
REFERENCES = {FP: ("black", "unquantized"), "gguf": ("dimgray", "gguf")}  # drawn as markers of their own, no line


def model_method(model: str) -> str:
    """The series a model is plotted in: its llmq recipe's method, another quantizer's quant_method
    (compressed-tensors, ...), "gguf" for a GGUF file, FP for an unquantized model (or a hub id)."""
    p = Path(model)
    if p.suffix == ".gguf" or (p.is_dir() and not any(p.glob("*.safetensors")) and any(p.glob("*.gguf"))):
        return "gguf"
    try:
        qc = json.loads((p / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return FP
    if qc.get("quant_method") == "llmq":
        return (qc.get("recipe") or {}).get("method", "llmq")
    return qc.get("quant_method") or FP


def _fmt(metric: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if metric in ("acc", "acc_norm", "top1_agree"):
        return f"{100 * v:.2f}"
    if metric.startswith("kl"):
        return f"{v:.4f}"
    return f"{v:.3f}"


def present_columns(results: dict) -> list[tuple]:
    return [c for c in COLUMNS if any(isinstance(r.get(c[0]), dict) and c[1] in r[c[0]] for r in results.values())]


def compare_table(results: dict) -> str:
    """Markdown: one row per model, one column per task metric (accuracies in %)."""
    cols = present_columns(results)
    head = ["model", "bits/weight"] + [c[2] + (" ↑" if c[3] else " ↓") for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, r in results.items():
        bpw = r.get("bpw")
        cells = [name, "-" if bpw is None else f"{bpw:.3f}"]
        cells += [_fmt(m, (r.get(t) or {}).get(m)) for t, m, _, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def protocol_mismatches(results: dict) -> list[str]:
    """Tasks whose protocol differs between models (numbers that must not be compared)."""
    seen: dict[str, set] = {}
    for r in results.values():
        for task, v in r.items():
            if isinstance(v, dict) and "protocol" in v:
                # the KL line names its cache state, and times differ: compare the measuring protocol only
                seen.setdefault(task, set()).add(v["protocol"].split("; cache")[0])
    return [t for t, ps in seen.items() if len(ps) > 1]


def metric_series(results: dict, task: str, metric: str) -> dict[str, list[tuple[float, float, str]]]:
    """{method: [(bits per weight, value, model), ...] sorted by bits} for one metric (accuracies in %)."""
    series: dict[str, list] = {}
    for name, r in results.items():
        v = (r.get(task) or {}).get(metric)
        if v is not None and r.get("bpw") is not None:
            y = 100 * v if metric in ("acc", "acc_norm", "top1_agree") else v
            series.setdefault(r.get("method") or model_method(name), []).append((r["bpw"], y, name))
    return {m: sorted(pts) for m, pts in series.items()}


def draw_compare(results: dict):
    """The matplotlib figure: each metric against bits per weight, one panel per metric, one line per method
    through its checkpoints (sorted by bits), every point labelled with its model's name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = present_columns(results)
    if not cols or not any(metric_series(results, t, m) for t, m, _, _ in cols):
        from llmq.errors import InputError

        raise InputError("nothing to plot: no model has both a bits-per-weight value and a result")
    methods = sorted({m for t, mt, _, _ in cols for m in metric_series(results, t, mt)} - set(REFERENCES))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}  # the same color for a method in every panel
    ncol = min(3, len(cols))
    nrow = math.ceil(len(cols) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.6 * nrow), squeeze=False)
    for ax, (task, metric, label, higher) in zip(axes.flat, cols):
        series = metric_series(results, task, metric)
        for method, pts in sorted(series.items()):
            xs, ys, _ = zip(*pts)
            if method in REFERENCES:
                color, name = REFERENCES[method]
                ax.plot(xs, ys, "*", color=color, markersize=10, label=name)
            else:
                ax.plot(xs, ys, "o-", color=colors[method], label=method)
            for x, y, n in pts:
                ax.annotate(Path(n).name[:28], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ys = [y for pts in series.values() for _, y, _ in pts]
        if metric in ("ppl",) and ys and min(ys) > 0 and max(ys) / min(ys) > 5:  # one bad checkpoint would flatten the rest
            ax.set_yscale("log")
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.set_xlabel("bits per weight (decoder linear layers)", fontsize=8)
        ax.margins(x=0.25)  # room for the point labels
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_compare(results: dict, path: Path) -> Path:
    """draw_compare's figure written to PATH (PNG)."""
    fig = draw_compare(results)  # (selects matplotlib's Agg backend before pyplot is imported)
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
