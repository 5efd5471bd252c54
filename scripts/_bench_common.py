"""What the SmolLM2 benchmark scripts (bench_binary, bench_e8p, bench_lut, bench_rotation, bench_vq) share:
their common arguments, the perplexity protocol every row is measured with, the byte breakdown of quantized
layers, report saving, and the lock that serialises heavy jobs on a shared machine."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections import defaultdict
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
LOCK = "/tmp/llmq-heavy.lock"


def add_common_args(ap, work: str) -> None:
    ap.add_argument("--model", type=Path, default=SHARED / "models/smollm2-135m-instruct-q4_1")
    ap.add_argument("--work", type=Path, default=Path(work))
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)


def ppl(model, tok, limit) -> dict:
    """WikiText-2 test, GPTQ protocol, ctx 2048, the first `limit` windows."""
    from llmq.eval.perplexity import perplexity

    return perplexity(model, tok, "wikitext2", seqlen=2048, limit=limit, data=os.environ["LLMQ_DATA_DIR"]).to_dict()


def breakdown(folder: Path, layers: dict) -> dict:
    """Bytes of the quantized layers' tensors by tensor kind (qweight, scales, codebooks, signs, ...) across the checkpoint."""
    from llmq.inspect_ckpt import tensor_bytes

    out = defaultdict(int)
    for name, nbytes in tensor_bytes(folder).items():
        owner, _, leaf = name.rpartition(".")
        if owner in layers and leaf != "bias":
            out[leaf] += nbytes
    return dict(out)


def save_report(results: dict, out: Path, write_md) -> None:
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    write_md(results, out.with_suffix(".md"))


@contextlib.contextmanager
def heavy_lock():
    """One heavy job at a time (`flock LOCK` from the shell takes the same lock; set LLMQ_HEAVY_LOCK_HELD=1 then)."""
    if os.environ.get("LLMQ_HEAVY_LOCK_HELD"):
        yield
        return
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def setup_env(threads: int) -> None:
    """Local data, no hub, and the requested torch threads (here and in subprocesses)."""
    import torch

    os.environ.setdefault("LLMQ_DATA_DIR", str(SHARED / "data"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def load_results(jf: Path, proto: dict, ignore: tuple = ()) -> dict:
    """The report's earlier results (finished runs are kept), refusing ones made with another protocol; keys in
    `ignore` (speed settings such as threads) are dropped from an older protocol before comparing."""
    import sys

    results = json.loads(jf.read_text()) if jf.is_file() else {}
    for k in ignore:
        (results.get("protocol") or {}).pop(k, None)
    if results.get("protocol") not in (None, proto):
        sys.exit(f"{jf} was made with {results['protocol']}; remove it or pass the same settings")
    results["protocol"] = proto
    results.setdefault("runs", {})
    return results
