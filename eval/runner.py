"""`llmq eval`: run the chosen tasks on each model, print one markdown table with the protocol beside each
number, write the JSON, and (with --compare) one table and one plot across models."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmq.errors import InputError

from .perplexity import PPL_TASKS
from .tasks import ZEROSHOT_TASKS

ALL_TASKS = tuple(PPL_TASKS) + ("kl",) + ZEROSHOT_TASKS
# "zeroshot" = the suite without HellaSwag (whose data file is optional); name hellaswag to add it
ALIASES = {"zeroshot": [t for t in ZEROSHOT_TASKS if t != "hellaswag"], "ppl": list(PPL_TASKS)}


@dataclass
class EvalOptions:
    tasks: list[str]
    seqlen: int = 2048
    stride: int | None = None
    limit: int | None = None
    batch_size: int = 1
    batch_tokens: int = 4096
    dtype: str = "fp32"
    data_dir: str | None = None
    task_data: dict[str, str] = field(default_factory=dict)
    reference: str | None = None
    kl_dataset: str = "wikitext2"
    kl_topk: int = 64
    kl_cache: Path | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[self.dtype]

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def parse_tasks(spec: str) -> list[str]:
    tasks: list[str] = []
    for t in (x.strip() for x in spec.split(",")):
        if not t:
            continue
        for name in ALIASES.get(t, [t]):
            if name not in ALL_TASKS:
                raise InputError(f"unknown task {name!r} (choose from {', '.join(ALL_TASKS)}, or zeroshot, ppl)")
            if name not in tasks:
                tasks.append(name)
    if not tasks:
        raise InputError("--tasks is empty")
    return tasks


def parse_task_data(items: list[str] | None) -> dict[str, str]:
    out = {}
    for it in items or []:
        name, sep, path = it.partition("=")
        if not sep or name not in ZEROSHOT_TASKS:
            raise InputError(f"--task-data expects TASK=FILE with TASK one of {', '.join(ZEROSHOT_TASKS)}, got {it!r}")
        out[name] = path
    return out


def validate(opts: EvalOptions) -> None:
    if opts.limit is not None and opts.limit < 1:
        raise InputError("--limit must be at least 1")
    if opts.dtype not in ("fp32", "bf16"):
        raise InputError(f"--dtype must be fp32 or bf16, got {opts.dtype!r}")
    if opts.seqlen < 2:
        raise InputError("--seqlen must be at least 2")
    if opts.batch_size < 1 or opts.batch_tokens < 1:
        raise InputError("--batch-size and --batch-tokens must be at least 1")
    if "kl" in opts.tasks and not opts.reference:
        raise InputError("task kl needs --reference MODEL (the unquantized model)")
    if opts.kl_dataset not in PPL_TASKS:
        raise InputError(f"--kl-dataset must be one of {', '.join(PPL_TASKS)}")


def summary(task: str, r: dict) -> str:
    if task in PPL_TASKS:
        return f"ppl {r['ppl']:.3f}"
    if task == "kl":
        return f"KL mean {r['kl_mean']:.4f}, p99 {r['kl_p99']:.4f}, top-1 agree {100 * r['top1_agree']:.2f}%, ppl {r['ppl']:.3f} (ref {r['ppl_reference']:.3f})"
    parts = [f"{m} {100 * r[m]:.2f} ± {100 * r['stderr'][m]:.2f}" for m in ("acc", "acc_norm") if m in r]
    if "ppl" in r:
        parts.append(f"ppl {r['ppl']:.3f}")
    return ", ".join(parts)


def markdown_results(results: dict) -> str:
    lines = ["| model | task | result | protocol | time (s) |", "|---|---|---|---|---:|"]
    for m, res in results.items():
        for task, r in res.items():
            if isinstance(r, dict) and "protocol" in r:
                lines.append(f"| {m} | {task} | {summary(task, r)} | {r['protocol']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def evaluate_model(model_path: str, opts: EvalOptions, progress, log=lambda m: None) -> dict:
    """All tasks on one model; `progress()` is a context manager yielding a rich Progress."""
    from llmq.loading import load_causal_lm

    from .compare import bits_per_weight, model_method
    from .kl import kl_divergence
    from .perplexity import perplexity
    from .zeroshot import evaluate_zeroshot
    from llmq.data import data_dir as resolve_data_dir

    dd = resolve_data_dir(opts.data_dir)
    windows = any(t in PPL_TASKS or t == "kl" for t in opts.tasks)
    model, tok, kind = load_causal_lm(model_path, opts.torch_dtype, seqlen=opts.seqlen if windows else None)
    res: dict = {"kind": kind, "method": model_method(model_path), "bpw": bits_per_weight(model_path)}
    name = Path(model_path).name or model_path
    for t in opts.tasks:
        with progress() as p:
            bar: dict = {}

            def start(n, label=t):
                bar["id"] = p.add_task(f"{name} {label}", total=n)

            def advance(k):
                p.advance(bar["id"], k)

            if t in PPL_TASKS:
                r = perplexity(model, tok, t, seqlen=opts.seqlen, limit=opts.limit, batch_size=opts.batch_size,
                               data=opts.data_dir, stride=opts.stride, on_start=start, on_batch=advance).to_dict()
            elif t == "kl":
                r = kl_divergence(model, tok, opts.reference, task=opts.kl_dataset, seqlen=opts.seqlen, limit=opts.limit,
                                  topk=opts.kl_topk, batch_size=opts.batch_size, data=opts.data_dir, cache_dir=opts.kl_cache,
                                  dtype=opts.torch_dtype, on_start=lambda n, what: start(n, f"kl ({what})"),
                                  on_batch=advance, log=log).to_dict()
            else:
                r = evaluate_zeroshot(model, tok, t, dd, opts.task_data, opts.limit, opts.batch_tokens,
                                      on_start=start, on_progress=advance).to_dict()
        res[t] = r
    del model
    return res


def load_results_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read results from {path}: {e}") from None
    return {k: v for k, v in data.items() if not k.startswith("_") and isinstance(v, dict)}


def meta(opts: EvalOptions) -> dict:
    import transformers

    return {"llmq_eval": 1, "options": opts.to_dict(), "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(), "python": platform.python_version()}
