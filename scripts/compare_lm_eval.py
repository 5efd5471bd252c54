"""llmq's zero-shot scores against lm-evaluation-harness 0.4 on the same local data, same model, same items.

Runs in an environment that has lm-eval next to llmq (it does not change torch or transformers):

    python -m venv --system-site-packages /tmp/venv-lme && /tmp/venv-lme/bin/pip install "lm-eval==0.4.*"
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 /tmp/venv-lme/bin/python scripts/compare_lm_eval.py --limit 500

lm-eval side: its own `HFLM` wrapped around the model object llmq loads (here the fp SmolLM2 from its GGUF
folder), with task YAMLs written to a temporary folder that copy lm-eval's built-in `piqa`, `arc_easy` and
`winogrande` definitions (prompt, choices, target delimiter, metrics) but read the local files
(`dataset_path: json` + `data_files`). PIQA's labels file is merged into the JSON lines first; ARC and
WinoGrande are in MosaicML's format (see ../shared/ASSETS.md), mapped field by field. llmq side:
`llmq.eval.zeroshot.evaluate_zeroshot` on the same files. Both take the first `--limit` items of each task.

Writes reports/lm_eval_compare/{lm_eval.json, llmq.json} and reports/lm_eval_compare.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMQ_SHARED", REPO.parent / "shared"))

# lm-eval 0.4.13's tasks/piqa/piqa.yaml, tasks/arc/arc_easy.yaml, tasks/winogrande/default.yaml, with local data
YAMLS = {
    "piqa": """task: llmq_piqa
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    # MosaicML's query is "Question: {question}"; lm-eval's prompt is "Question: {question}\\nAnswer:"
    "arc_easy": """task: llmq_arc_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{query}}}}\\nAnswer:"
doc_to_target: gold
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    # lm-eval's winogrande: doc_to_text = index of the right option (an int: "multiple input" partial
    # scoring), doc_to_choice = the sentence up to the blank with each option, doc_to_target = the rest, stripped
    "winogrande": """task: llmq_winogrande
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{gold}}}}"
doc_to_target: "{{{{continuation.strip()}}}}"
doc_to_choice: "{{{{context_options}}}}"
metric_list:
  - metric: acc
""",
}


def write_tasks(folder: Path, data: Path) -> None:
    rows = [json.loads(x) for x in (data / "piqa/valid.jsonl").read_text().splitlines() if x.strip()]
    labels = [int(x) for x in (data / "piqa/valid-labels.lst").read_text().split()]
    piqa = folder / "piqa.jsonl"
    piqa.write_text("".join(json.dumps({**r, "label": y}) + "\n" for r, y in zip(rows, labels)))
    files = {"piqa": piqa, "arc_easy": data / "zeroshot-mosaic/arc_easy.jsonl", "winogrande": data / "zeroshot-mosaic/winogrande.jsonl"}
    for name, text in YAMLS.items():
        (folder / f"llmq_{name}.yaml").write_text(text.format(data=files[name].resolve()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models/smollm2-135m-instruct-q4_1"))
    ap.add_argument("--data", default=str(SHARED / "data"))
    ap.add_argument("--tasks", default="piqa,arc_easy,winogrande")
    ap.add_argument("--limit", type=int, default=None, help="first N items of each task, on both sides")
    ap.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "reports/lm_eval_compare"))
    args = ap.parse_args()

    import lm_eval
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llmq.eval.zeroshot import evaluate_zeroshot
    from llmq.loading import load_causal_lm

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok, kind = load_causal_lm(args.model, torch.float32)
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "lm_eval": getattr(lm_eval, "__version__", "?"),
           "threads": torch.get_num_threads(), "model": args.model, "model_kind": kind, "limit": args.limit}

    ours = {}
    for t in tasks:
        r = evaluate_zeroshot(model, tok, t, Path(args.data), limit=args.limit, keep_loglikelihoods=True)
        ours[t] = r.to_dict()
        print(f"llmq    {t}: {r.metrics} ({r.n} items, {r.seconds:.0f} s)", flush=True)
    (out / "llmq.json").write_text(json.dumps({"env": env, "results": ours}, indent=2))

    with tempfile.TemporaryDirectory() as td:
        write_tasks(Path(td), Path(args.data))
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=[f"llmq_{t}" for t in tasks], num_fewshot=0, limit=args.limit,
                                      task_manager=TaskManager(include_path=td), log_samples=True)
        secs = time.perf_counter() - t0
    theirs = {t: {k.split(",")[0]: v for k, v in res["results"][f"llmq_{t}"].items() if "," in k} for t in tasks}
    # item by item: lm-eval's per-choice log-likelihoods against llmq's (same items, same order of choices)
    for t in tasks:
        samples = sorted(res["samples"][f"llmq_{t}"], key=lambda s: s["doc_id"])
        lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        theirs[t]["loglikelihoods"] = lls
        mine = ours[t]["extra"]["loglikelihoods"]
        diffs = [abs(a - b) for x, y in zip(mine, lls) for a, b in zip(x, y)]
        theirs[t]["max_abs_ll_diff"] = max(diffs)
        theirs[t]["items_compared"] = len(lls)
    (out / "lm_eval.json").write_text(json.dumps({"env": env, "seconds": secs, "results": theirs,
                                                  "configs": {t: res["configs"][f"llmq_{t}"] for t in tasks}}, indent=2, default=str))
    print(f"lm-eval: {theirs} ({secs:.0f} s)", flush=True)

    lines = ["# llmq zero-shot vs lm-evaluation-harness on the same local data", "",
             f"Model: `{args.model}` ({kind}, fp32), torch {env['torch']}, transformers {env['transformers']}, "
             f"lm-eval {env['lm_eval']}, {env['threads']} threads. Items: "
             + (f"the first {args.limit} of each task (both sides)." if args.limit else "all."),
             "Command: `HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 /tmp/venv-lme/bin/python scripts/compare_lm_eval.py"
             + (f" --limit {args.limit}" if args.limit else "") + (f" --threads {args.threads}" if args.threads else "") + "`",
             f"1-minute load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (times below are inflated when it exceeds the threads used).", "",
             "| task | metric | items | llmq | lm-eval | difference (points) | within 0.2 | max abs log-lik. diff per choice |", "|---|---|---:|---:|---:|---:|---|---:|"]
    ok = True
    for t in tasks:
        for m in ("acc", "acc_norm"):
            if m in ours[t] and m in theirs[t]:
                d = 100 * (ours[t][m] - theirs[t][m])
                ok &= abs(d) <= 0.2
                lines.append(f"| {t} | {m} | {ours[t]['n']} | {100 * ours[t][m]:.2f} | {100 * theirs[t][m]:.2f} | {d:+.2f} | {'yes' if abs(d) <= 0.2 else 'NO'} | {theirs[t]['max_abs_ll_diff']:.2e} |")
    lines += ["", f"Time: llmq {sum(ours[t]['seconds'] for t in tasks):.0f} s, lm-eval {secs:.0f} s (scoring only, same process, same model object).",
              "Raw outputs: `reports/lm_eval_compare/llmq.json`, `reports/lm_eval_compare/lm_eval.json`."]
    (out.parent / "lm_eval_compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
