"""What the CLI prints: `llmq --version`, and tables that stay readable at 80 columns (numbers whole, never cut)."""

import io
import json
import re
from collections import Counter

import pytest
from rich.console import Console
from typer.testing import CliRunner

import llmq
import llmq.cli as cli
from llmq.cli import _print_quantize_summary, app

from conftest import DATA

runner = CliRunner()
NUMBER = re.compile(r"\d[\d.,x]*(?:e[-+]\d+)?")  # 4.500, 2.75e-02, 1,234, 96x160


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output == f"llmq {llmq.__version__}\n"


@pytest.fixture(scope="module")
def gptq_ckpt(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "q"
    r = runner.invoke(app, ["quantize", str(tiny_model), "-o", str(out), "--method", "gptq", "--bits", "4", "--group-size", "32",
                            "--nsamples", "4", "--seqlen", "32", "--data-dir", str(DATA)])
    assert r.exit_code == 0, r.output
    return out


def render(width: int, fn) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    fn(console)
    return console.export_text()


def assert_fits_80(fn) -> str:
    """Every number of the unconstrained rendering appears whole at 80 columns; nothing is cut with '…'."""
    narrow, wide = render(80, fn), render(400, fn)
    assert "…" not in narrow and max(map(len, narrow.splitlines())) <= 80, narrow
    assert Counter(NUMBER.findall(narrow)) == Counter(NUMBER.findall(wide)), narrow
    return narrow


@pytest.mark.parametrize("verbose", [False, True])
def test_quantize_summary_fits_80_columns(gptq_ckpt, verbose):
    report = json.loads((gptq_ckpt / "llmq_report.json").read_text())
    # the widest cells a summary can have: every error column, a long method name, asymmetric groups, long times
    for r in report["layers"]:
        if r["layer"].endswith("down_proj"):
            r.update(method="ternary", sym=False, group_size=128, seconds=1234.5)
    assert all(r["output_err"] is not None and r["rtn_output_err"] is not None for r in report["layers"])
    text = assert_fits_80(lambda c: _print_quantize_summary(report, gptq_ckpt, verbose, console=c))
    assert all(h in text for h in ("RTN out", "output", "weight", "time")) and "ternary" in text and "128 asym" in text


def test_inspect_table_fits_80_columns(gptq_ckpt, monkeypatch):
    def inspect(console):
        monkeypatch.setattr(cli, "out", console)
        assert runner.invoke(app, ["inspect", str(gptq_ckpt)]).exit_code == 0

    text = assert_fits_80(inspect)
    assert "96x160" in text and "8,640" in text
