"""Zero-shot task definitions, read from local files (the layout of ../shared/data, see ../shared/ASSETS.md).

Each task is written as lm-evaluation-harness 0.4 defines it (prompt, choices, delimiter, metrics), so the
numbers are comparable with `lm_eval --tasks <name>` on the same items:

    piqa           "Question: {goal}\\nAnswer:" + " {sol}"                        acc, acc_norm   validation (1,838)
    arc_easy       "Question: {question}\\nAnswer:" + " {choice}"                 acc, acc_norm   test (2,376)
    arc_challenge  same                                                           acc, acc_norm   test (1,172)
    boolq          "{passage}\\nQuestion: {question}?\\nAnswer:" + " no" / " yes"  acc             validation (3,270)
    winogrande     partial scoring: context = sentence up to the blank with each
                   option filled in, continuation = " " + the rest (scored alone) acc             xl dev (1,267)
    lambada        OpenAI version: all but the last word + " {last word}"       acc (greedy), ppl  test (5,153)
    hellaswag      "{activity_label}: {ctx}" + " {ending}"                        acc, acc_norm   validation (10,042)

acc = argmax of the summed continuation log-likelihoods; acc_norm = argmax of the sums divided by the
length of the choice text in characters (lm-eval's acc_norm).
"""

from __future__ import annotations

import bz2
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from llmq.errors import InputError


@dataclass
class Doc:
    requests: list[tuple[str, str]]  # (context, continuation), one per choice
    gold: int
    choice_lengths: list[int] = field(default_factory=list)  # characters of each choice text (acc_norm)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    default_file: str  # relative to the data folder
    dataset: str
    split: str
    metrics: tuple[str, ...]
    prompt: str


TASKS = {
    "piqa": TaskSpec("piqa", "piqa/valid.jsonl", "PIQA", "validation", ("acc", "acc_norm"),
                     'lm-eval piqa: "Question: {goal}\\nAnswer:" + " {sol}"'),
    "arc_easy": TaskSpec("arc_easy", "zeroshot-mosaic/arc_easy.jsonl", "ARC-Easy", "test", ("acc", "acc_norm"),
                         'lm-eval arc_easy: "Question: {question}\\nAnswer:" + " {choice}"'),
    "arc_challenge": TaskSpec("arc_challenge", "zeroshot-mosaic/arc_challenge.jsonl", "ARC-Challenge", "test", ("acc", "acc_norm"),
                              'lm-eval arc_challenge: "Question: {question}\\nAnswer:" + " {choice}"'),
    "boolq": TaskSpec("boolq", "zeroshot-mosaic/boolq.jsonl", "BoolQ", "validation", ("acc",),
                      'lm-eval boolq: "{passage}\\nQuestion: {question}?\\nAnswer:" + " no"/" yes"'),
    "winogrande": TaskSpec("winogrande", "zeroshot-mosaic/winogrande.jsonl", "WinoGrande xl", "validation", ("acc",),
                           "lm-eval winogrande: partial scoring (option-filled prefix, score the rest)"),
    "lambada": TaskSpec("lambada", "lambada/lambada_test.jsonl", "LAMBADA (OpenAI)", "test", ("acc", "ppl"),
                        "lm-eval lambada_openai: last word, greedy accuracy and perplexity of the word"),
    "hellaswag": TaskSpec("hellaswag", "hellaswag/hellaswag_val_full.txt.bz2", "HellaSwag", "validation", ("acc", "acc_norm"),
                          'lm-eval hellaswag: "{activity_label}: {ctx}" + " {ending}" (ctx_b not re-capitalized)'),
}
ZEROSHOT_TASKS = tuple(TASKS)


def _jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path} as JSON lines: {e}") from None


def _field(row: dict, key: str, path: Path):
    if key not in row:
        raise InputError(f"{path}: a row has no {key!r} field")
    return row[key]


def _mc(context: str, choices: list[str], gold: int) -> Doc:
    return Doc([(context, " " + c) for c in choices], int(gold), [len(c) for c in choices])


def load_piqa(path: Path) -> list[Doc]:
    labels_path = path.with_name(path.name.replace(".jsonl", "-labels.lst"))
    if not labels_path.is_file():
        raise InputError(f"PIQA labels file not found beside {path}: {labels_path}")
    rows = _jsonl(path)
    labels = [int(x) for x in labels_path.read_text().split()]
    if len(labels) != len(rows):
        raise InputError(f"{path} has {len(rows)} items but {labels_path} has {len(labels)} labels")
    return [_mc(f"Question: {_field(r, 'goal', path)}\nAnswer:", [r["sol1"], r["sol2"]], y) for r, y in zip(rows, labels)]


def load_arc(path: Path) -> list[Doc]:
    # MosaicML ICL format: query already reads "Question: {question}"
    return [_mc(_field(r, "query", path) + "\nAnswer:", _field(r, "choices", path), _field(r, "gold", path)) for r in _jsonl(path)]


def load_boolq(path: Path) -> list[Doc]:
    docs = []
    for r in _jsonl(path):
        # MosaicML writes "Passage: {passage}\nQuestion: {question}?"; lm-eval has no "Passage: " prefix
        query = _field(r, "query", path).removeprefix("Passage: ")
        docs.append(_mc(query + "\nAnswer:", _field(r, "choices", path), _field(r, "gold", path)))
    return docs


def load_winogrande(path: Path) -> list[Doc]:
    docs = []
    for r in _jsonl(path):
        cont = " " + _field(r, "continuation", path).strip()
        opts = _field(r, "context_options", path)
        docs.append(Doc([(c, cont) for c in opts], int(_field(r, "gold", path)), [len(c) for c in opts]))
    return docs


def load_lambada(path: Path) -> list[Doc]:
    docs = []
    for r in _jsonl(path):
        words = _field(r, "text", path).split(" ")
        docs.append(Doc([(" ".join(words[:-1]), " " + words[-1])], 0, [len(words[-1])]))
    return docs


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(path: Path) -> list[Doc]:
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) % 6:
        raise InputError(f"{path}: expected 6 lines per item (context, label, 4 endings), got {len(lines)} lines")
    docs = []
    for i in range(0, len(lines), 6):
        ctx, label, endings = lines[i], lines[i + 1], lines[i + 2:i + 6]
        docs.append(_mc(_hellaswag_clean(ctx), [_hellaswag_clean(e) for e in endings], int(label)))
    return docs


LOADERS = {"piqa": load_piqa, "arc_easy": load_arc, "arc_challenge": load_arc, "boolq": load_boolq,
           "winogrande": load_winogrande, "lambada": load_lambada, "hellaswag": load_hellaswag}


def task_path(task: str, data_dir: Path | None, overrides: dict[str, str] | None = None) -> Path:
    if overrides and task in overrides:
        p = Path(overrides[task]).expanduser()
    elif data_dir is not None:
        p = data_dir / TASKS[task].default_file
    else:
        raise InputError(f"no data for task {task!r}: pass --data-dir (layout of ../shared/data), set LLMQ_DATA_DIR, "
                         f"or --task-data {task}=FILE")
    if not p.is_file():
        raise InputError(f"data file for task {task!r} not found: {p}")
    return p


def load_task(task: str, data_dir: Path | None, overrides: dict[str, str] | None = None, limit: int | None = None) -> tuple[list[Doc], int, Path]:
    """(the first `limit` docs, number of docs available, file read)."""
    if task not in TASKS:
        raise InputError(f"unknown zero-shot task {task!r} (choose from {', '.join(TASKS)})")
    path = task_path(task, data_dir, overrides)
    docs = LOADERS[task](path)
    if not docs:
        raise InputError(f"{path} holds no items")
    for d in docs:
        if not 0 <= d.gold < len(d.requests):
            raise InputError(f"{path}: gold index {d.gold} out of range for {len(d.requests)} choices")
    return (docs if limit is None else docs[:limit]), len(docs), path
