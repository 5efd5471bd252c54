"""`llmq eval --compare --plot`: one series per method (a line through its checkpoints sorted by bits), unquantized
and GGUF models as markers of their own, every point labelled."""

import json

from llmq.eval.compare import draw_compare, model_method


def ppl(method, bpw, value):
    return {"method": method, "bpw": bpw, "wikitext2": {"ppl": value}}


def test_plot_draws_one_series_per_method(tmp_path):
    old = tmp_path / "old-gptq"  # a result stored before results named their method: read from the checkpoint
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "llmq", "recipe": {"method": "gptq"}}}))
    results = {"fp": ppl("fp", 16.0, 19.1), "rtn-w4": ppl("rtn", 4.25, 24.0), "higgs-w4": ppl("higgs", 4.02, 21.0),
               "rtn-w3": ppl("rtn", 3.25, 60.0), "higgs-w3": ppl("higgs", 3.02, 30.0), "src.gguf": ppl("gguf", 5.0, 19.2),
               "no-bpw": ppl("rtn", None, 99.0), str(old): {"bpw": 4.5, "wikitext2": {"ppl": 23.0}}}
    fig = draw_compare(results)
    ax = fig.axes[0]
    lines = {l.get_label(): (list(l.get_xdata()), list(l.get_ydata()), l.get_linestyle()) for l in ax.lines}
    assert lines == {"rtn": ([3.25, 4.25], [60.0, 24.0], "-"), "higgs": ([3.02, 4.02], [30.0, 21.0], "-"),
                     "gptq": ([4.5], [23.0], "-"), "unquantized": ([16.0], [19.1], "None"), "gguf": ([5.0], [19.2], "None")}
    assert sorted(t.get_text() for t in ax.texts) == sorted(n.split("/")[-1] for n in results if n != "no-bpw")
    assert {t.get_text() for t in ax.get_legend().get_texts()} == set(lines)


def test_model_method(tmp_path, tiny_model):
    def folder(name, config=None, files=()):
        d = tmp_path / name
        d.mkdir()
        if config is not None:
            (d / "config.json").write_text(json.dumps(config))
        for f in files:
            (d / f).write_bytes(b"")
        return str(d)

    assert model_method(folder("q", {"quantization_config": {"quant_method": "llmq", "recipe": {"method": "higgs"}}})) == "higgs"
    assert model_method(folder("ct", {"quantization_config": {"quant_method": "compressed-tensors"}})) == "compressed-tensors"
    assert model_method(folder("g", files=["m.gguf"])) == "gguf"
    assert model_method(str(tiny_model)) == "fp" and model_method("Org/some-hub-model") == "fp"
