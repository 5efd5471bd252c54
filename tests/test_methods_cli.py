"""`llmq methods`: every registered method with its format, bit widths, calibration use and options (defaults and
docs), generated from the method declarations, readable at 80 columns."""

import dataclasses

from typer.testing import CliRunner

from llmq.cli import app
from llmq.methods import METHODS


def test_methods_lists_every_method_and_option():
    r = CliRunner().invoke(app, ["methods"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert max(map(len, lines)) <= 80
    heads = [l for l in lines if l and not l.startswith(" ")]
    assert [h.split(":")[0] for h in heads] == list(METHODS)
    for name, m in METHODS.items():
        i = lines.index(next(h for h in heads if h.startswith(name + ":")))
        block = lines[i:next((j for j in range(i + 1, len(lines)) if lines[j] == ""), len(lines))]
        assert f"format {m.format}" in block[0] and f"calibration: {m.calibration.value}" in block[0]
        text = " ".join(" ".join(block).split())
        for f in m.option_fields():
            row = next(l for l in block if l.split()[:1] == [f.name])
            default = "null" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
            assert row.split()[1] == default, (name, f.name, row)
            assert f.metadata["doc"] in text, (name, f.name)
        if not m.option_fields():
            assert "  options: none" in block
    gptq = METHODS["gptq"]
    assert {f.name: f.default for f in dataclasses.fields(gptq.Options)} == {"act_order": True, "damp": 0.01, "block_size": 128, "fp64": False}
