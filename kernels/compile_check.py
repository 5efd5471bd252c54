"""Compile every Triton kernel variant listed next to its kernel (`COMPILE_VARIANTS` of each `*_triton.py`) for a GPU
architecture without a GPU (Triton ships ptxas): catches what the interpreter accepts but the GPU compiler rejects
(tl.dot shapes, non-constexpr globals, type errors).

    python -m llmq.kernels.compile_check [--arch 90] [--only lut,vq]

Must run without TRITON_INTERPRET=1 (the interpreter replaces kernels by Python functions).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path


def variants():
    """(name, parameters, kernel, signature, constexprs, compile options) of every kernel module, in file order."""
    for path in sorted(Path(__file__).parent.glob("*_triton.py")):
        yield from importlib.import_module(f"{__package__}.{path.stem}").COMPILE_VARIANTS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--only", default="", help="comma-separated kernel names (int, lut, vq, e8p, billm, pbllm, ternary, hadamard)")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET to compile")
    from .triton_common import compile_kernel

    only = set(filter(None, args.only.split(",")))
    for name, params, fn, sig, consts, options in variants():
        if only and name not in only:
            continue
        k = compile_kernel(fn, sig, consts, args.arch, **options)
        print(f"ok sm_{args.arch} {name} {params}: {k.metadata.shared} B shared memory", flush=True)


if __name__ == "__main__":
    main()
