"""`llmq` command line: quantize, eval, inspect, export, methods."""

from __future__ import annotations

import atexit
import functools
import json
import os
import signal
import sys
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import InputError, WriteFailure

app = typer.Typer(help="llmq: post-training weight quantization for LLMs.", no_args_is_help=True, add_completion=False)
console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 140)


INTERRUPT_NOTES = {"quantize": "; finished blocks are kept in the work folder and the same command resumes"}


def guarded(fn):
    """Bad input: one line on stderr, exit 2. Our bug: one line, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            print(f"llmq: error: {e}", file=sys.stderr)
            raise typer.Exit(2)
        except WriteFailure as e:  # the machine's state (disk full, read-only folder), not a bug of ours
            print(f"llmq: error: {e}", file=sys.stderr)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            print(f"llmq: interrupted{INTERRUPT_NOTES.get(fn.__name__, '')}", file=sys.stderr)
            raise typer.Exit(130)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # noqa: BLE001
            print(f"llmq: internal error: {type(e).__name__}: {e}", file=sys.stderr)
            raise typer.Exit(1)

    return wrapper


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"llmq {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the llmq version and exit.")] = False):
    """llmq: post-training weight quantization for LLMs."""


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


@app.command()
@guarded
def quantize(
    model: Annotated[str, typer.Argument(help="Unquantized model: local Hugging Face folder, hub id, or folder/file with one .gguf.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (appears only when complete).")],
    method: Annotated[Optional[str], typer.Option(help="Quantization method: rtn, gptq, e8p, vq, higgs, nf4, any4, billm, pbllm or ternary (default rtn; billm/pbllm/ternary ignore --bits, their knobs are recipe options).")] = None,
    bits: Annotated[Optional[int], typer.Option(help="Bits per weight code, 2-8 (default 4).")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="Input features per scale group; 0 = per output channel (default 128). A group size that does not divide a row gives a shorter last group.")] = None,
    sym: Annotated[Optional[bool], typer.Option("--sym/--asym", help="Symmetric grid (no zero point) or asymmetric (default: symmetric).")] = None,
    mse_clip: Annotated[Optional[bool], typer.Option("--mse-clip/--no-mse-clip", help="Search a clipped range per group minimising squared error (default off).")] = None,
    act_order: Annotated[Optional[bool], typer.Option("--act-order/--no-act-order", help="GPTQ: quantize columns in decreasing Hessian-diagonal order, with static groups: no inference cost (default on).")] = None,
    true_sequential: Annotated[Optional[bool], typer.Option("--true-sequential/--block-sequential", help="Re-collect each linear group's inputs after the groups before it in the block are quantized (default: block at a time).")] = None,
    rotate: Annotated[str, typer.Option(help="Rotation before quantization: none; hadamard (per-layer randomized Hadamard incoherence, applied online at inference); residual (residual-stream rotation with RMSNorm folding, zero inference cost; unties the head); both.")] = "none",
    recipe: Annotated[Optional[Path], typer.Option(help="YAML recipe (defaults plus per-layer regex overrides); flags given here override its defaults.")] = None,
    calib: Annotated[str, typer.Option(help="Calibration data: auto (c4 when a method uses calibration data, none for data-free rtn/nf4/higgs), c4, wikitext2, none, hf:NAME[:CONFIG[:SPLIT]], or a local .txt/.jsonl/.parquet file.")] = "auto",
    nsamples: Annotated[int, typer.Option(help="Number of calibration windows.")] = 128,
    seqlen: Annotated[Optional[int], typer.Option(help="Tokens per calibration window (default 2048, or the model's context if shorter).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for drawing calibration windows.")] = 0,
    calib_dtype: Annotated[str, typer.Option(help="dtype of the calibration forward passes: auto (bf16 on CPUs with native bf16 matmul, as the GPTQ reference runs fp16; else fp32), fp32, bf16, fp16. Weights, Hessians and the quantization math are fp32 regardless.")] = "auto",
    data_dir: Annotated[Optional[str], typer.Option(help="Local data folder (layout of ../shared/data); default $LLMQ_DATA_DIR, else the hub.")] = None,
    dtype: Annotated[str, typer.Option(help="dtype of tensors kept unquantized (embeddings, norms): auto (as the source stores them; fp16 for a GGUF, whose blocks carry fp16 scales), fp16, bf16, fp32.")] = "auto",
    batch_size: Annotated[Optional[int], typer.Option(help="Calibration sequences per forward pass (default: as many as fill 4096 tokens).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    verbose: Annotated[bool, typer.Option(help="Print every layer in the summary, not one row per layer type.")] = False,
):
    """Quantize MODEL block by block and write a packed llmq checkpoint to OUTPUT."""
    from .calib import CalibConfig
    from .pipeline import QuantizeJob, run_quantize
    from .recipe import Recipe

    r = Recipe.from_cli(recipe, method=method, bits=bits, group_size=group_size, sym=sym, mse_clip=mse_clip,
                        act_order=act_order, true_sequential=true_sequential, rotate=rotate)
    job = QuantizeJob(model=model, out=output, recipe=r, dtype=dtype, batch_size=batch_size, overwrite=overwrite,
                      calib=CalibConfig(source=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, data_dir=data_dir,
                                        dtype=calib_dtype))
    report = run_quantize(job, log=lambda m: console.print(f"[dim]{m}[/dim]"), progress=_progress)
    _print_quantize_summary(report, output, verbose)


def _compact_table(**kw) -> Table:
    """A table that fits 80 columns: no frame, one space between columns, two-line headers given explicitly, and
    cells that fold onto a second line, never cut with "…", when the terminal is narrower still."""
    return Table(box=box.SIMPLE_HEAD, show_edge=False, padding=0, **kw)


def _print_quantize_summary(report: dict, output: Path, verbose: bool, console: Console | None = None) -> None:
    from .inspect_ckpt import inspect_checkpoint

    console = console or out
    info = inspect_checkpoint(str(output))
    rows = report["layers"]
    has_out = any(r["output_err"] is not None for r in rows)
    has_rtn = any(r.get("rtn_output_err") is not None for r in rows)
    t = _compact_table(title=f"llmq quantize -> {output}")
    for col in ["layer" if verbose else "layer type", None if verbose else "layers", "method", "bits", "group",
                "bits/\nweight", "weight\nerr", "output\nerr" if has_out else None, "RTN out\nerr" if has_rtn else None,
                "time\n(s)"]:
        if col:
            t.add_column(col, justify="left" if col in ("layer", "layer type") else "right", overflow="fold")
    groups = defaultdict(list)
    for r in rows:
        key = r["layer"] if verbose else r["layer"].split(".")[-1]
        groups[key].append(r)
    for key, rs in groups.items():
        mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        cells = [key, None if verbose else str(len(rs)), rs[0]["method"], str(rs[0]["bits"]),
                 str(rs[0]["group_size"]) + ("" if rs[0]["sym"] else " asym"), f"{mean('bpw'):.3f}", f"{mean('weight_err'):.2e}"]
        if has_out:
            cells.append(f"{mean('output_err'):.2e}")
        if has_rtn:
            cells.append(f"{mean('rtn_output_err'):.2e}" if all(r.get("rtn_output_err") is not None for r in rs) else "-")
        cells.append(f"{sum(r['seconds'] for r in rs):.1f}")
        t.add_row(*(c for c in cells if c is not None))
    console.print(t)
    err_note = "weight err = ‖W−Q‖²/‖W‖²" + ("; output err = ‖WX−QX‖²/‖WX‖² on the calibration inputs" if has_out else "")
    if has_rtn:
        err_note += "; RTN out err = the same for round-to-nearest on the same layer, inputs and grid"
    console.print(f"{'mean over layers of each type; ' if not verbose else ''}{err_note}")
    console.print(
        f"quantized linear layers: {info['quantized_bytes']:,} B for {info['quantized_weights']:,} weights = "
        f"{info['quantized_bpw']:.3f} bits/weight; checkpoint total {info['total_file_bytes']:,} B; "
        f"time {report['seconds']:.1f} s"
    )


@app.command("eval")
@guarded
def eval_(
    models: Annotated[list[str], typer.Argument(help="Models to evaluate: llmq checkpoints or unquantized models (folder, hub id, GGUF folder); with --compare also results .json files from earlier runs.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated: wikitext2, c4 (perplexity), kl (needs --reference), piqa, arc_easy, arc_challenge, boolq, winogrande, lambada, hellaswag; 'zeroshot' = all zero-shot tasks but hellaswag.")] = "wikitext2",
    seqlen: Annotated[int, typer.Option(help="Context length of each perplexity / KL window.")] = 2048,
    stride: Annotated[Optional[int], typer.Option(help="Perplexity with sliding windows advancing by this many tokens (default: GPTQ protocol, non-overlapping windows).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Per task: score only the first N windows (perplexity, KL) or items (zero-shot).")] = None,
    batch_size: Annotated[int, typer.Option(help="Perplexity / KL windows per forward pass.")] = 1,
    batch_tokens: Annotated[int, typer.Option(help="Zero-shot: padded tokens per forward pass (requests sorted by length, shared contexts scored once).")] = 4096,
    dtype: Annotated[str, typer.Option(help="Compute dtype: fp32 or bf16.")] = "fp32",
    calib_dtype: Annotated[str, typer.Option(help="dtype of the calibration forward passes: auto (bf16 on CPUs with native bf16 matmul, as the GPTQ reference runs fp16; else fp32), fp32, bf16, fp16. Weights, Hessians and the quantization math are fp32 regardless.")] = "auto",
    data_dir: Annotated[Optional[str], typer.Option(help="Local data folder (layout of ../shared/data); default $LLMQ_DATA_DIR, else the hub (perplexity only).")] = None,
    task_data: Annotated[Optional[list[str]], typer.Option(help="TASK=FILE: read a zero-shot task from this file instead of the data folder (repeatable).")] = None,
    reference: Annotated[Optional[str], typer.Option(help="Unquantized model for the kl task.")] = None,
    kl_dataset: Annotated[str, typer.Option(help="Text whose windows the kl task scores: wikitext2 or c4.")] = "wikitext2",
    kl_topk: Annotated[int, typer.Option(help="Reference log-probs cached per token (top-k plus a tail bucket).")] = 64,
    kl_cache: Annotated[Optional[Path], typer.Option(help="Folder for cached reference log-probs (default $LLMQ_CACHE/kl or ~/.cache/llmq/kl).")] = None,
    compare: Annotated[bool, typer.Option(help="Also print one row per model (metrics against bits per weight) and write a PNG plot.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="PNG path for --compare (default llmq_compare.png).")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write results, with the full protocol, to this JSON file.")] = None,
):
    """Evaluate perplexity, KL divergence to a reference and zero-shot accuracy of one or more models; prints the protocol beside every number."""
    from llmq.eval.compare import compare_table, plot_compare, protocol_mismatches
    from llmq.eval.runner import (EvalOptions, evaluate_model, load_results_json, markdown_results, meta, parse_task_data,
                                  parse_tasks, validate)

    opts = EvalOptions(tasks=parse_tasks(tasks), seqlen=seqlen, stride=stride, limit=limit, batch_size=batch_size,
                       batch_tokens=batch_tokens, dtype=dtype, data_dir=data_dir, task_data=parse_task_data(task_data),
                       reference=reference, kl_dataset=kl_dataset, kl_topk=kl_topk, kl_cache=kl_cache)
    validate(opts)
    from .workdir import check_writable_file

    for path, option in ((json_path, "--json"), ((plot or Path("llmq_compare.png")) if compare else None, "--plot")):
        if path is not None:
            check_writable_file(path, option)  # before the evaluation, not after it
    results: dict = {}
    for m in models:
        if compare and m.endswith(".json") and Path(m).is_file():
            results.update(load_results_json(Path(m)))
            continue
        results[m] = evaluate_model(m, opts, _progress, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
        if json_path:  # written after every model, so a long sweep keeps what it finished
            json_path.write_text(json.dumps({"_meta": meta(opts), **results}, indent=2))
    print(markdown_results(results))
    if compare:
        print()
        print(compare_table(results))
        bad = protocol_mismatches(results)
        if bad:
            print(f"warning: the protocol differs between models for {', '.join(bad)}: those numbers are not comparable")
        png = plot_compare(results, plot or Path("llmq_compare.png"))
        print(f"plot: {png}")
    if json_path:
        json_path.write_text(json.dumps({"_meta": meta(opts), **results}, indent=2))


def _yaml_value(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


@app.command()
@guarded
def methods():
    """List the quantization methods: format, bit widths, calibration use and recipe options with defaults."""
    import dataclasses
    import textwrap

    from .methods import METHODS

    lines = []
    for m in METHODS.values():
        fields = ", ".join(f for f in ("bits", "group_size", "sym", "mse_clip") if f in m.uses_fields) or "none"
        lines += [f"{m.name}: format {m.format}; bits {m.bit_widths}; calibration: {m.calibration.value}",
                  f"  recipe fields: {fields}" + (f" (group_size default {m.default_group_size})" if m.default_group_size else "")]
        opts = m.option_fields()
        if not opts:
            lines.append("  options: none")
        for f in opts:
            head = f"  {f.name:<18} {_yaml_value(f.default if f.default is not dataclasses.MISSING else None):<7} "
            lines += textwrap.wrap(f.metadata["doc"], 80, initial_indent=head, subsequent_indent=" " * len(head))
        lines.append("")
    print("\n".join(lines).rstrip())


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
    t = _compact_table()
    for col in ("layer", "method", "format", "bits", "group", "shape\nout x in", "bytes", "bits/\nweight"):
        t.add_column(col, justify="left" if col in ("layer", "method", "format") else "right", overflow="fold")
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
    format: Annotated[str, typer.Option("--format", help="Target format: compressed-tensors (pack-quantized; symmetric 4/8-bit, group size dividing every input dimension, no stored group index; GPTQ act-order exports).")] = "compressed-tensors",
    dtype: Annotated[str, typer.Option(help="dtype of the exported scales and unquantized tensors: auto (the checkpoint's), fp16, bf16, fp32.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder, if it is an earlier llmq export or empty.")] = False,
):
    """Convert an llmq checkpoint to a format that loads without llmq (transformers + compressed-tensors, vLLM)."""
    from .export import export_checkpoint

    s = export_checkpoint(checkpoint, output, format, overwrite=overwrite, dtype=dtype, log=lambda m: console.print(f"[dim]{m}[/dim]"))
    out.print(f"exported {s['layers']} layers ({s['bits']}-bit, group {s['group_size'] or 'per channel'}, scales {s['scale_dtype']}) "
              f"to {output} as compressed-tensors pack-quantized; {s['bytes']:,} B of tensors; not quantized: {', '.join(s['ignore']) or 'none'}")


def _silence_stderr_at_exit() -> None:
    """Triton's bindings (nanobind), which torch imports, print ~30 lines of "leaked instance" reports while the
    interpreter shuts down: noise from the binding, not ours. Our last word has been written by then."""
    sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)


def main():
    signal.signal(signal.SIGINT, signal.default_int_handler)  # start-up is over (see llmq/__init__.py)
    atexit.register(_silence_stderr_at_exit)  # registered first, so it runs after every other exit handler
    try:
        app()
    except KeyboardInterrupt:  # between commands' own handling (start-up, argument parsing)
        print("llmq: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
