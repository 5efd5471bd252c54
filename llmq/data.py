"""Text sources for calibration and evaluation. With a data folder (`--data-dir` or LLMQ_DATA_DIR, laid
out like ../shared/data) everything is read locally; otherwise through `datasets` from the hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import InputError

WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"
C4_VALIDATION = "c4-validation-2k/c4_validation_2k.parquet"
C4_EVAL_DOCS = 1100  # GPTQ's C4 evaluation: the first 1,100 validation documents joined with " "


def data_dir(arg: str | None = None) -> Path | None:
    d = arg or os.environ.get("LLMQ_DATA_DIR")
    if not d:
        return None
    p = Path(d).expanduser()
    if not p.is_dir():
        raise InputError(f"data folder does not exist: {p}")
    return p


def _need(dd: Path, rel: str) -> Path:
    p = dd / rel
    if not p.is_file():
        raise InputError(f"data file not found: {p}")
    return p


def _hub(*args, **kwargs):
    try:
        import datasets

        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:
        raise InputError(f"cannot load dataset {args[0]!r} from the hub ({type(e).__name__}); pass --data-dir or set LLMQ_DATA_DIR") from None


def wikitext2_rows(dd: Path | None, split: str = "test") -> list[str]:
    """Rows as in HF `wikitext-2-raw-v1`: one per line, whitespace-only lines become ''."""
    if dd is None:
        return list(_hub("wikitext", "wikitext-2-raw-v1", split=split)["text"])
    name = {"test": WIKITEXT2_TEST, "train": "wikitext-2-raw/wiki.train.raw", "validation": "wikitext-2-raw/wiki.valid.raw"}[split]
    with open(_need(dd, name), encoding="utf-8", newline="") as f:
        return [line if line.strip() else "" for line in f]


def c4_validation_docs(dd: Path | None) -> list[str]:
    if dd is None:
        return list(_hub("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation")["text"][:2000])
    import pyarrow.parquet as pq

    return pq.read_table(_need(dd, C4_VALIDATION)).column("text").to_pylist()


def read_text_file(path: Path) -> list[str]:
    """A local .txt (whole file), .jsonl / .json (field 'text') or .parquet (column 'text')."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise InputError(f"{path} has no 'text' column")
            return [t for t in table.column("text").to_pylist() if t]
        if suffix in (".jsonl", ".json"):
            lines = path.read_text(encoding="utf-8").splitlines()
            rows = [json.loads(line) for line in lines if line.strip()]
            return [r["text"] for r in rows if isinstance(r, dict) and r.get("text")]
        return [path.read_text(encoding="utf-8")]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError) as e:
        raise InputError(f"cannot read text from {path}: {e}") from None
