"""Zero-shot evaluation: score every choice of every item (eval/scoring.py), then lm-eval's metrics:

    acc       = mean over items of [argmax_i  LL_i == gold]
    acc_norm  = mean over items of [argmax_i  LL_i / len(choice_i in characters) == gold]
    LAMBADA:  acc = mean of [the last word is the greedy continuation],  ppl = exp(-mean over items of LL(word))
    stderr    = sample standard deviation / sqrt(n)   (lm-eval's mean_stderr)
Ties go to the first choice (numpy/torch argmax).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .scoring import score_requests
from .tasks import TASKS, Doc, load_task


@dataclass
class ZeroShotResult:
    task: str
    metrics: dict[str, float]
    stderr: dict[str, float]
    n: int
    n_available: int
    requests: int
    tokens: int  # continuation tokens scored
    dataset: str
    split: str
    prompt: str
    data_file: str
    dtype: str
    seconds: float
    extra: dict = field(default_factory=dict)

    def protocol(self) -> str:
        return (f"{self.dataset} {self.split}, 0-shot, {self.n}/{self.n_available} items, {self.prompt}, "
                f"summed continuation log-likelihood{', acc_norm per character' if 'acc_norm' in self.metrics else ''}, {self.dtype}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(self.metrics)  # acc / acc_norm / ppl at the top level of the task's JSON
        d["protocol"] = self.protocol()
        return d


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first index among ties


def _stderr(xs: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def metrics_from_scores(task: str, docs: list[Doc], scores: list) -> tuple[dict[str, float], dict[str, float]]:
    it = iter(scores)
    per_doc = [[next(it) for _ in d.requests] for d in docs]
    if task == "lambada":
        acc = [float(s[0].is_greedy) for s in per_doc]
        lls = [s[0].logprob for s in per_doc]
        return ({"acc": sum(acc) / len(acc), "ppl": math.exp(-sum(lls) / len(lls))}, {"acc": _stderr(acc)})
    acc, acc_norm = [], []
    for d, s in zip(docs, per_doc):
        lls = [x.logprob for x in s]
        acc.append(float(_argmax(lls) == d.gold))
        acc_norm.append(float(_argmax([ll / max(1, n) for ll, n in zip(lls, d.choice_lengths)]) == d.gold))
    m = {"acc": sum(acc) / len(acc)}
    se = {"acc": _stderr(acc)}
    if "acc_norm" in TASKS[task].metrics:
        m["acc_norm"] = sum(acc_norm) / len(acc_norm)
        se["acc_norm"] = _stderr(acc_norm)
    return m, se


def evaluate_zeroshot(model, tok, task: str, data_dir: Path | None = None, overrides: dict[str, str] | None = None,
                      limit: int | None = None, batch_tokens: int = 4096, on_start=None, on_progress=None,
                      keep_loglikelihoods: bool = False) -> ZeroShotResult:
    docs, available, path = load_task(task, data_dir, overrides, limit)
    requests = [r for d in docs for r in d.requests]
    if on_start:
        on_start(len(requests))
    t0 = time.perf_counter()
    scores = score_requests(model, tok, requests, batch_tokens=batch_tokens, on_progress=on_progress)
    seconds = time.perf_counter() - t0
    metrics, stderr = metrics_from_scores(task, docs, scores)
    spec = TASKS[task]
    extra = {}
    if keep_loglikelihoods:  # per item, per choice: for checking against another harness item by item
        it = iter(scores)
        extra["loglikelihoods"] = [[next(it).logprob for _ in d.requests] for d in docs]
    return ZeroShotResult(
        task=task, metrics=metrics, stderr=stderr, n=len(docs), n_available=available, requests=len(requests),
        tokens=sum(s.ntokens for s in scores), dataset=spec.dataset, split=spec.split, prompt=spec.prompt,
        data_file=str(path), dtype=str(next(model.parameters()).dtype).replace("torch.", ""), seconds=seconds, extra=extra,
    )
