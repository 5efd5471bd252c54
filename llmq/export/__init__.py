"""Exporters from llmq checkpoints to formats other runtimes load without llmq.

Every format goes through `export_checkpoint`: the source is validated (llmq.checkpoint), the destination
checked, and the format's `write(ckpt, work, **options)` fills a temporary folder beside the destination that
is renamed into place only when complete, and removed on any error.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

from ..errors import InputError

EXPORT_FORMATS = {"compressed-tensors": ".compressed_tensors"}  # format -> module providing write()
EXPORT_MARKER = "llmq_export.json"  # marks a folder as an llmq export, which --overwrite may replace


def check_destination(src: Path, dest: Path, overwrite: bool) -> None:
    s, d = src.resolve(), dest.resolve()
    if d == s or s in d.parents or d in s.parents:  # replacing DEST would delete (part of) the checkpoint
        raise InputError(f"output folder {dest} must not be, lie inside or contain the checkpoint {src}")
    if not (dest.exists() or dest.is_symlink()):
        return
    if not overwrite:
        raise InputError(f"output folder {dest} exists (pass --overwrite to replace it)")
    if dest.is_symlink() or not dest.is_dir() or (any(dest.iterdir()) and not (dest / EXPORT_MARKER).is_file()):
        raise InputError(f"--overwrite replaces only an empty folder or an earlier llmq export (with {EXPORT_MARKER}); "
                         f"{dest} is neither")


def export_checkpoint(src, dest, format: str, overwrite: bool = False, **options) -> dict:
    """Export the llmq checkpoint SRC to DEST in FORMAT; returns the format's summary."""
    from ..checkpoint import validate_checkpoint

    src, dest = Path(src), Path(dest)
    if format not in EXPORT_FORMATS:
        raise InputError(f"unknown export format {format!r} (choose from {', '.join(EXPORT_FORMATS)})")
    ckpt = validate_checkpoint(src)
    check_destination(src, dest, overwrite)
    write = importlib.import_module(EXPORT_FORMATS[format], __name__).write
    work = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(work, ignore_errors=True)  # left by a killed run
    work.mkdir(parents=True)
    try:
        summary = write(ckpt, work, **options)
        (work / EXPORT_MARKER).write_text(json.dumps({"format": format, "source": str(src.resolve())}, indent=2))
        if dest.exists():
            shutil.rmtree(dest)
        work.rename(dest)
    except BaseException:  # any error or interrupt: leave neither DEST nor a partial folder behind
        shutil.rmtree(work, ignore_errors=True)
        raise
    return summary
