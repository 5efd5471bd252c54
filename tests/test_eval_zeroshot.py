"""Zero-shot tasks: lm-eval prompts on the shared files, lm-eval metrics, the CLI table/JSON, and --compare."""

import json
import math

import pytest
from typer.testing import CliRunner

from conftest import DATA
from llmq.cli import app
from llmq.errors import InputError
from llmq.eval.scoring import Score
from llmq.eval.tasks import Doc, load_task
from llmq.eval.zeroshot import metrics_from_scores

SIZES = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "winogrande": 1267, "lambada": 5153, "hellaswag": 10042}


@pytest.mark.parametrize("task", list(SIZES))
def test_task_files_and_prompts(task):
    docs, n, path = load_task(task, DATA, limit=3)
    assert n == SIZES[task] and len(docs) == 3 and path.is_file()
    d = docs[0]
    ctxs = [c for c, _ in d.requests]
    conts = [x for _, x in d.requests]
    if task == "piqa":
        assert ctxs[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
        assert conts[0].startswith(" Provide the guinea pig") and len(conts) == 2 and d.gold == 0
    if task.startswith("arc"):
        assert ctxs[0].startswith("Question: ") and ctxs[0].endswith("\nAnswer:") and len(set(ctxs)) == 1 and len(conts) == 4
    if task == "boolq":
        assert not ctxs[0].startswith("Passage: ") and ctxs[0].endswith("?\nAnswer:") and conts == [" no", " yes"]
    if task == "winogrande":
        assert ctxs == ["Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"]
        assert conts == [" always got the easier cases."] * 2 and d.gold == 1
    if task == "lambada":
        (ctx, word), = d.requests
        assert word.startswith(" ") and " " not in word[1:] and not ctx.endswith(" ")
    if task == "hellaswag":
        assert ctxs[0] == "Roof shingle removal: A man is sitting on a roof. he" and d.gold == 3 and len(conts) == 4
    assert all(x.startswith(" ") for x in conts)


def test_metrics_follow_lm_eval():
    two = [("q", " a"), ("q", " b")]
    # (lls, choice lengths in characters, gold): acc = argmax LL, acc_norm = argmax LL / length, ties -> first
    items = [((-8.0, -20.0), [10, 40], 0),   # acc right, acc_norm wrong (-0.8 < -0.5)
             ((-5.0, -5.0), [5, 5], 1),      # tie: choice 0 in both, wrong
             ((-3.0, -2.0), [20, 10], 0),    # acc wrong, acc_norm right (-0.15 > -0.2)
             ((-1.0, -9.0), [1, 1], 0),      # both right
             ((-2.0, -3.0), [1, 100], 1)]    # acc wrong, acc_norm right
    docs = [Doc(two, gold, lengths) for _, lengths, gold in items]
    scores = [Score(v, False, 1) for lls, _, _ in items for v in lls]
    m, se = metrics_from_scores("piqa", docs, scores)
    assert m == {"acc": pytest.approx(0.4), "acc_norm": pytest.approx(0.6)}
    acc = [1, 0, 0, 1, 0]
    assert se["acc"] == pytest.approx(math.sqrt(sum((x - 0.4) ** 2 for x in acc) / 4 / 5))
    m, _ = metrics_from_scores("boolq", docs, scores)
    assert m == {"acc": pytest.approx(0.4)}  # boolq: acc only, as lm-eval

    lam, _, _ = load_task("lambada", DATA, limit=2)
    m, _ = metrics_from_scores("lambada", lam, [Score(-1.0, True, 2), Score(-3.0, False, 1)])
    assert m == {"acc": 0.5, "ppl": pytest.approx(math.exp(2.0))}
    wino, _, _ = load_task("winogrande", DATA, limit=1)
    m, _ = metrics_from_scores("winogrande", wino, [Score(-2.0, False, 5), Score(-1.0, False, 5)])
    assert m == {"acc": 1.0}  # gold is 1; winogrande reports acc only, as lm-eval


def test_bad_task_inputs(tmp_path):
    with pytest.raises(InputError):
        load_task("nope", DATA)
    with pytest.raises(InputError, match="not found"):
        load_task("hellaswag", tmp_path)
    bad = tmp_path / "arc.jsonl"
    bad.write_text('{"query": "Question: x", "choices": ["a", "b"], "gold": 5}\n')
    with pytest.raises(InputError, match="out of range"):
        load_task("arc_easy", None, {"arc_easy": str(bad)})


def test_cli_zeroshot_compare_and_plot(tiny_model, tmp_path):
    runner = CliRunner()
    q = tmp_path / "q4"
    assert runner.invoke(app, ["quantize", str(tiny_model), "-o", str(q), "--calib", "none", "--bits", "4", "--group-size", "32"]).exit_code == 0
    js, png = tmp_path / "r.json", tmp_path / "cmp.png"
    r = runner.invoke(app, ["eval", str(tiny_model), str(q), "--tasks", "wikitext2,piqa,winogrande,lambada", "--seqlen", "32",
                            "--limit", "4", "--json", str(js), "--compare", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())
    assert res["_meta"]["options"]["limit"] == 4
    for m in (str(tiny_model), str(q)):
        assert 0 <= res[m]["piqa"]["acc"] <= 1 and "acc_norm" in res[m]["piqa"] and res[m]["piqa"]["n"] == 4
        assert "acc_norm" not in res[m]["winogrande"] and res[m]["lambada"]["ppl"] > 1
    assert res[str(q)]["bpw"] == pytest.approx(4 + 16 / 32, abs=0.01) and res[str(tiny_model)]["bpw"] == 32
    assert res[str(q)]["method"] == "rtn" and res[str(tiny_model)]["method"] == "fp"  # the plot's series
    assert "| model | bits/weight |" in r.output and "piqa acc" in r.output and "4/1838 items" in r.output
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    # --compare from stored results only, no model loaded
    r2 = runner.invoke(app, ["eval", str(js), "--compare", "--plot", str(tmp_path / "again.png")])
    assert r2.exit_code == 0, r2.output
    assert str(q) in r2.output and (tmp_path / "again.png").is_file()
    r3 = runner.invoke(app, ["eval", str(q), "--tasks", "piqa,bogus"])
    assert r3.exit_code == 2 and "bogus" in r3.output
