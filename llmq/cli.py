"""`llmq` command line: quantize, eval, inspect, export."""

from __future__ import annotations

import functools
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import InputError

app = typer.Typer(help="llmq: post-training weight quantization for LLMs.", no_args_is_help=True, add_completion=False)
console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 140)


def guarded(fn):
    """Bad input: one line on stderr, exit 2. Our bug: one line, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            print(f"llmq: error: {e}", file=sys.stderr)
            raise typer.Exit(2)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001
            print(f"llmq: internal error: {type(e).__name__}: {e}", file=sys.stderr)
            raise typer.Exit(1)

    return wrapper


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


@app.command()
@guarded
def quantize(
    model: Annotated[str, typer.Argument(help="Unquantized model: local Hugging Face folder, hub id, or folder/file with one .gguf.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (appears only when complete).")],
    method: Annotated[Optional[str], typer.Option(help="Quantization method: rtn or gptq (default rtn).")] = None,
    bits: Annotated[Optional[int], typer.Option(help="Bits per weight code, 2-8 (default 4).")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="Input features per scale group; 0 = per output channel (default 128). A group size that does not divide a row gives a shorter last group.")] = None,
    sym: Annotated[Optional[bool], typer.Option("--sym/--asym", help="Symmetric grid (no zero point) or asymmetric (default: symmetric).")] = None,
    mse_clip: Annotated[Optional[bool], typer.Option("--mse-clip/--no-mse-clip", help="Search a clipped range per group minimising squared error (default off).")] = None,
    act_order: Annotated[Optional[bool], typer.Option("--act-order/--no-act-order", help="GPTQ: quantize columns in decreasing Hessian-diagonal order, with static groups (default off).")] = None,
    true_sequential: Annotated[Optional[bool], typer.Option("--true-sequential/--block-sequential", help="Re-collect each linear group's inputs after the groups before it in the block are quantized (default: block at a time).")] = None,
    rotate: Annotated[str, typer.Option(help="Rotation before quantization: none.")] = "none",
    recipe: Annotated[Optional[Path], typer.Option(help="YAML recipe (defaults plus per-layer regex overrides); flags given here override its defaults.")] = None,
    calib: Annotated[str, typer.Option(help="Calibration data: c4, wikitext2, none, hf:NAME[:CONFIG[:SPLIT]], or a local .txt/.jsonl/.parquet file.")] = "c4",
    nsamples: Annotated[int, typer.Option(help="Number of calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 2048,
    seed: Annotated[int, typer.Option(help="Seed for drawing calibration windows.")] = 0,
    data_dir: Annotated[Optional[str], typer.Option(help="Local data folder (layout of ../shared/data); default $LLMQ_DATA_DIR, else the hub.")] = None,
    dtype: Annotated[str, typer.Option(help="dtype of tensors kept unquantized (embeddings, norms): auto (as the source stores them), fp16, bf16, fp32.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Calibration sequences per forward pass.")] = 1,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    verbose: Annotated[bool, typer.Option(help="Print every layer in the summary, not one row per layer type.")] = False,
):
    """Quantize MODEL block by block and write a packed llmq checkpoint to OUTPUT."""
    from .calib import CalibConfig
    from .pipeline import QuantizeJob, run_quantize
    from .recipe import Recipe

    r = Recipe.from_yaml(recipe) if recipe else Recipe()
    for key, val in (("method", method), ("bits", bits), ("group_size", group_size), ("sym", sym), ("mse_clip", mse_clip)):
        if val is not None:
            setattr(r.default, key, val)
    if true_sequential is not None:
        r.true_sequential = true_sequential
    if act_order is not None:
        r.default.options["act_order"] = act_order
    r.rotate = rotate if rotate != "none" or recipe is None else r.rotate
    job = QuantizeJob(model=model, out=output, recipe=r, dtype=dtype, batch_size=batch_size, overwrite=overwrite,
                      calib=CalibConfig(source=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, data_dir=data_dir))
    report = run_quantize(job, log=lambda m: console.print(f"[dim]{m}[/dim]"), progress=_progress)
    _print_quantize_summary(report, output, verbose)


def _print_quantize_summary(report: dict, output: Path, verbose: bool) -> None:
    from .inspect_ckpt import inspect_checkpoint

    info = inspect_checkpoint(str(output))
    rows = report["layers"]
    has_out = any(r["output_err"] is not None for r in rows)
    has_rtn = any(r.get("rtn_output_err") is not None for r in rows)
    t = Table(title=f"llmq quantize -> {output}")
    for col in ["layer" if verbose else "layer type", "layers", "method", "bits", "group", "bits/weight", "weight err", "output err" if has_out else None,
                "RTN output err" if has_rtn else None, "time (s)"]:
        if col:
            t.add_column(col, justify="left" if col.startswith("layer") and col != "layers" else "right")
    groups = defaultdict(list)
    for r in rows:
        key = r["layer"] if verbose else r["layer"].split(".")[-1]
        groups[key].append(r)
    for key, rs in groups.items():
        mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        cells = [key, str(len(rs)), rs[0]["method"], str(rs[0]["bits"]), str(rs[0]["group_size"]) + ("" if rs[0]["sym"] else " asym"),
                 f"{mean('bpw'):.3f}", f"{mean('weight_err'):.2e}"]
        if has_out:
            cells.append(f"{mean('output_err'):.2e}")
        if has_rtn:
            cells.append(f"{mean('rtn_output_err'):.2e}" if all(r.get("rtn_output_err") is not None for r in rs) else "-")
        cells.append(f"{sum(r['seconds'] for r in rs):.1f}")
        t.add_row(*cells)
    out.print(t)
    err_note = "weight err = ‖W−Q‖²/‖W‖²" + ("; output err = ‖WX−QX‖²/‖WX‖² on the calibration inputs" if has_out else "")
    if has_rtn:
        err_note += "; RTN output err = the same for round-to-nearest on the same layer, inputs and grid"
    out.print(f"{'mean over layers of each type; ' if not verbose else ''}{err_note}")
    out.print(
        f"quantized linear layers: {info['quantized_bytes']:,} B for {info['quantized_weights']:,} weights = "
        f"{info['quantized_bpw']:.3f} bits/weight; checkpoint total {info['total_file_bytes']:,} B; "
        f"time {report['seconds']:.1f} s"
    )


@app.command("eval")
@guarded
def eval_(
    models: Annotated[list[str], typer.Argument(help="Models to evaluate: llmq checkpoints or unquantized models (folder, hub id, GGUF folder).")],
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks: wikitext2, c4.")] = "wikitext2",
    seqlen: Annotated[int, typer.Option(help="Context length of each perplexity window.")] = 2048,
    limit: Annotated[Optional[int], typer.Option(help="Score only the first N windows (quick comparisons).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 1,
    dtype: Annotated[str, typer.Option(help="Compute dtype: fp32 or bf16.")] = "fp32",
    data_dir: Annotated[Optional[str], typer.Option(help="Local data folder (layout of ../shared/data); default $LLMQ_DATA_DIR, else the hub.")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write results, with the full protocol, to this JSON file.")] = None,
):
    """Evaluate perplexity (GPTQ protocol) of one or more models; prints the protocol beside every number."""
    import torch

    from llmq.eval.perplexity import PPL_TASKS, perplexity

    from .loading import load_causal_lm

    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    for t in task_list:
        if t not in PPL_TASKS:
            raise InputError(f"unknown task {t!r} (choose from {', '.join(PPL_TASKS)})")
    if limit is not None and limit < 1:
        raise InputError("--limit must be at least 1")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(dtype)
    if dt is None:
        raise InputError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    results = {}
    table = Table(title="llmq eval")
    for col in ("model", "task", "ppl", "protocol", "time (s)"):
        table.add_column(col, justify="right" if col in ("ppl", "time (s)") else "left")
    for m in models:
        model, tok, kind = load_causal_lm(m, dt)
        results[m] = {"kind": kind}
        for t in task_list:
            with _progress() as progress:
                bar = {}
                r = perplexity(model, tok, t, seqlen=seqlen, limit=limit, batch_size=batch_size, data=data_dir,
                               on_start=lambda n: bar.setdefault("id", progress.add_task(f"{Path(m).name} {t}", total=n)),
                               on_batch=lambda k: progress.advance(bar["id"], k))
            results[m][t] = r.to_dict()
            table.add_row(m, t, f"{r.ppl:.3f}", r.protocol(), f"{r.seconds:.0f}")
        del model
    out.print(table)
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))


@app.command()
@guarded
def inspect(
    checkpoint: Annotated[str, typer.Argument(help="An llmq checkpoint folder.")],
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the details to this JSON file.")] = None,
):
    """Print a checkpoint's recipe, each layer's method and bits per weight, and its total size."""
    from .inspect_ckpt import inspect_checkpoint

    info = inspect_checkpoint(checkpoint)
    out.print(f"[bold]{checkpoint}[/bold]  format v{info['format_version']}")
    out.print(f"recipe: {json.dumps(info['recipe'])}")
    out.print(f"calibration: {json.dumps(info['calibration'])}")
    t = Table()
    for col in ("layer", "method", "format", "bits", "group", "shape (out x in)", "bytes", "bits/weight"):
        t.add_column(col, justify="left" if col in ("layer", "method", "format") else "right")
    for r in info["layers"]:
        t.add_row(r["layer"], r["method"], r["format"], str(r["bits"]), str(r["group_size"]) + ("" if r["sym"] else " asym"),
                  f"{r['out_features']}x{r['in_features']}", f"{r['bytes']:,}", f"{r['bpw']:.3f}")
    out.print(t)
    out.print(
        f"quantized layers: {info['quantized_bytes']:,} B / {info['quantized_weights']:,} weights = {info['quantized_bpw']:.3f} bits/weight "
        "(codes, scales, zero points, group indices; biases excluded)\n"
        f"unquantized tensors: {info['unquantized_tensor_bytes']:,} B; all files: {info['total_file_bytes']:,} B"
    )
    if json_path:
        json_path.write_text(json.dumps(info, indent=2))


@app.command()
@guarded
def export(
    checkpoint: Annotated[Path, typer.Argument(help="An llmq checkpoint folder.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (appears only when complete).")],
    format: Annotated[str, typer.Option("--format", help="Target format: compressed-tensors (pack-quantized; symmetric 4/8-bit, group size dividing every input dimension, no act-order).")] = "compressed-tensors",
    dtype: Annotated[str, typer.Option(help="dtype of the exported scales and unquantized tensors: auto (the checkpoint's), fp16, bf16, fp32.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
):
    """Convert an llmq checkpoint to a format that loads without llmq (transformers + compressed-tensors, vLLM)."""
    from .export import EXPORT_FORMATS
    from .export.compressed_tensors import export_compressed_tensors

    if format not in EXPORT_FORMATS:
        raise InputError(f"unknown export format {format!r} (choose from {', '.join(EXPORT_FORMATS)})")
    s = export_compressed_tensors(checkpoint, output, dtype=dtype, overwrite=overwrite, log=lambda m: console.print(f"[dim]{m}[/dim]"))
    out.print(f"exported {s['layers']} layers ({s['bits']}-bit, group {s['group_size'] or 'per channel'}, scales {s['scale_dtype']}) "
              f"to {output} as compressed-tensors pack-quantized; {s['bytes']:,} B of tensors; not quantized: {', '.join(s['ignore']) or 'none'}")


def main():
    app()


if __name__ == "__main__":
    main()
