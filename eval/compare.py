"""Side-by-side results of several checkpoints: bits per weight, one markdown table, one PNG plot of quality
against bits per weight.

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


def _linear_bpw_safetensors(folder: Path) -> float | None:
    bits = elems = 0
    for p in sorted(folder.glob("*.safetensors")):
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, v in header.items():
            if name == "__metadata__" or len(v["shape"]) != 2 or any(s in name for s in _SKIP) or v["dtype"] not in _ST_BITS:
                continue
            e = v["shape"][0] * v["shape"][1]
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


def plot_compare(results: dict, path: Path) -> Path:
    """Each metric against bits per weight, one panel per metric, one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = present_columns(results)
    points = {n: r for n, r in results.items() if r.get("bpw") is not None}
    if not cols or not points:
        from llmq.errors import InputError

        raise InputError("nothing to plot: no model has both a bits-per-weight value and a result")
    ncol = min(3, len(cols))
    nrow = math.ceil(len(cols) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.6 * nrow), squeeze=False)
    for ax, (task, metric, label, higher) in zip(axes.flat, cols):
        xs, ys, names = [], [], []
        for name, r in points.items():
            v = (r.get(task) or {}).get(metric)
            if v is not None:
                xs.append(r["bpw"]), ys.append(100 * v if metric in ("acc", "acc_norm", "top1_agree") else v), names.append(name)
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [ys[i] for i in order], "o-", color="tab:blue")
        for x, y, n in zip(xs, ys, names):
            ax.annotate(Path(n).name[:28], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if metric in ("ppl",) and ys and min(ys) > 0 and max(ys) / min(ys) > 20:
            ax.set_yscale("log")
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.set_xlabel("bits per weight (decoder linear layers)", fontsize=8)
        ax.margins(x=0.25)  # room for the point labels
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
