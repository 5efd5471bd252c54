"""The streaming quantization pipeline behind `llmq quantize`.

    embeddings -> hidden states of the calibration samples
    for each decoder block:
        load its weights (only this block is in memory), collect input statistics,
        quantize its linear layers, write its tensors as one shard (atomically),
        run the samples through the *quantized* block to feed the next one, free it
    write embeddings / final norm / head, config.json with quantization_config, tokenizer, index
    rename the work folder to the output folder

Work happens in `.OUT.partial` beside OUT. A re-run of the same command after a crash or kill finds the
finished shards there, replays the calibration samples through those quantized blocks (cheap, and
bit-identical to the first run) and continues; OUT appears only when complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .adapters import adapter_for
from .blocks import BlockFactory
from .calib import DEFAULT_SEQLEN, CalibConfig, calib_batch_size, calibration_ids
from .data import data_dir
from .errors import InputError
from .formats import FORMAT_VERSION
from .hf import QUANT_METHOD
from .passes import DEFAULT_PASSES, BlockLoop
from .quantize_block import install_quantized, quantize_head
from .recipe import METHOD_NONE, Recipe
from .rotation import RotatedSource, check_sizes, residual_rotation
from .source import ModelSource
from .workdir import RunLock, check_output, files_fingerprint, prepare_work_dir, publish, write_failure

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
REPORT = "llmq_report.json"


@dataclass
class QuantizeJob:
    model: str
    out: Path
    recipe: Recipe = field(default_factory=Recipe)
    calib: CalibConfig = field(default_factory=CalibConfig)
    dtype: str = "auto"  # for tensors kept unquantized; auto = as the source stores them
    batch_size: int | None = None  # calibration sequences per pass; None: llmq.calib.calib_batch_size
    overwrite: bool = False
    passes: tuple = DEFAULT_PASSES  # what the block loop does to each block, in order (llmq.passes)

    def fingerprint(self, source: ModelSource, ids: torch.Tensor | None) -> dict:
        """Everything that changes the result: a work folder resumes only when all of it is equal."""
        weights = [source.gguf] if source.gguf is not None else [*source.dir.glob("*.safetensors"), *source.dir.glob("*.index.json")]
        config = [source.dir / "config.json"] if (source.dir / "config.json").is_file() else []
        return {
            "llmq": __version__,
            "torch": torch.__version__,
            "format_version": FORMAT_VERSION,
            "model": str(source.gguf or source.dir.resolve()),
            "model_files": files_fingerprint([*weights, *config, *source.tokenizer_files()]),
            "recipe": self.recipe.to_dict(),
            "calib": self.calib.to_dict(),
            # only when calibrating: a data-free run neither reads nor checks the data folder
            "calib_data_dir": str(data_dir(self.calib.data_dir) or "") if ids is not None else "",
            # the calibration windows themselves: covers a --calib file's contents, the data folder, the tokenizer
            "calib_samples": hashlib.blake2b(ids.numpy().tobytes(), digest_size=16).hexdigest() if ids is not None else None,
            "batch_size": self.batch_size,
            "dtype": self.dtype,
            "passes": [p.name for p in self.passes],
        }


def release_memory() -> None:
    """Hand freed heap memory back to the OS, so resident memory tracks what is really in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def keep_freed_memory_mapped() -> None:
    """Serve large allocations from the heap instead of fresh mmaps (glibc). Calibration allocates and
    frees the same activation-sized buffers thousands of times; as separate mmaps each one is page-faulted
    in and zeroed again (measured: the SmolLM2 GPTQ run took 75 s instead of 63 s). Freed memory is still
    handed back between blocks by `release_memory`."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: glibc's maximum, 32 MiB
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: no automatic trimming on every free
    except (OSError, AttributeError):  # not glibc
        pass


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def save_atomic(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_shard(path: Path) -> tuple[dict, dict]:
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads(meta.get("llmq_layers", "{}"))


def run_quantize(job: QuantizeJob, log=print, progress=None) -> dict:
    """Quantize job.model into job.out. Returns the report (also written to OUT/llmq_report.json).
    `progress`: optional factory of a rich Progress, opened once the work starts."""
    t_start = time.perf_counter()
    recipe = job.recipe.validate()
    if job.dtype != "auto" and job.dtype not in DTYPES:
        raise InputError(f"--dtype must be auto, fp16, bf16 or fp32, got {job.dtype!r}")
    keep_freed_memory_mapped()
    source = ModelSource(job.model)
    check_output(job.out, source.dir, job.overwrite)
    # `auto` settings resolved once, before any work (a bad --batch-size fails here); the fingerprint and
    # metadata name the real calibration source, length and dtype
    calib = _resolve_calib(job.calib, recipe, getattr(source.config, "max_position_embeddings", None), log)
    job = dataclasses.replace(job, calib=calib, batch_size=calib_batch_size(job.batch_size, calib.seqlen))
    adapter = adapter_for(source.config)
    factory = BlockFactory(source.config, adapter)
    check_sizes(recipe, source.config, quantize_head=recipe.spec_for(adapter.head).method != METHOD_NONE)
    _check_layer_shapes(recipe, factory, adapter)
    needs_calib = any(m.needs_hessian for m in _methods_used(recipe))
    if needs_calib and job.calib.source == "none":
        raise InputError("the chosen method needs calibration data; --calib none is only for data-free methods")
    with RunLock(job.out):
        ids = calibration_ids(job.calib, source.tokenizer()) if job.calib.source != "none" else None
        release_memory()
        gc.freeze()  # what exists now (imports, skeleton, tokenizer) lives to the end: later collections skip it
        tensors_src = source.tensors  # validates safetensors files / loads a GGUF
        out_dtype = DTYPES.get(job.dtype) or source.tensors.dtype_on_disk()
        if adapter.embed + ".weight" not in tensors_src.keys():
            raise InputError(f"{source.dir}: no tensor {adapter.embed}.weight; not a {adapter.family}-style checkpoint")

        work = prepare_work_dir(job.out, job.fingerprint(source, ids), log)
        try:
            with (progress() if progress else contextlib.nullcontext()) as bar:
                report = _quantize_blocks(job, source, adapter, factory, recipe, ids, work, out_dtype, bar, log)
            report["seconds"] = time.perf_counter() - t_start
            (work / REPORT).write_text(json.dumps(report, indent=2))
            publish(work, job.out)
        except InputError:
            shutil.rmtree(work, ignore_errors=True)  # bad input: nothing worth resuming
            raise
        except OSError as e:
            failure = write_failure(e, work)
            if failure is None:
                raise
            raise failure from None
    return report


def _resolve_calib(calib: CalibConfig, recipe: Recipe, max_ctx: int | None, log) -> CalibConfig:
    """`--calib auto`: C4 when a method in the recipe uses calibration data, none for data-free methods.
    Window length: as given (refused beyond the model's context), else 2048 or the context if shorter."""
    if calib.source == "auto":
        if any(m.uses_calibration for m in _methods_used(recipe)):
            calib = dataclasses.replace(calib, source="c4")
        else:
            log("no calibration: the recipe's methods use no calibration data (the report gives weight errors; --calib c4 adds output errors)")
            calib = dataclasses.replace(calib, source="none")
    if calib.seqlen is None:
        calib = dataclasses.replace(calib, seqlen=min(DEFAULT_SEQLEN, max_ctx or DEFAULT_SEQLEN))
    elif calib.source != "none" and max_ctx and calib.seqlen > max_ctx:
        raise InputError(f"--seqlen {calib.seqlen} is beyond the model's context of {max_ctx} tokens")
    return calib.resolved()


def _check_layer_shapes(recipe: Recipe, factory: BlockFactory, adapter) -> None:
    """Method limits that depend on a layer's shape (a method's optional `check_layer`), before any work."""
    from .methods import METHODS

    shapes = {n: (m.out_features, m.in_features) for n, m in factory.meta_block(0).named_modules() if isinstance(m, torch.nn.Linear)}
    for i in range(factory.num_blocks):
        for name, (n_out, n_in) in shapes.items():
            layer = adapter.block_prefix(i) + name
            spec = recipe.spec_for(layer)
            if spec.method in METHODS:
                METHODS[spec.method].check_layer(spec, n_out, n_in, f"layer {layer}")


def _methods_used(recipe: Recipe):
    from .methods import METHODS

    specs = [recipe.default] + [
        dataclasses.replace(recipe.default, **{k: v for k, v in o.items() if k != "match"}) for o in recipe.overrides
    ]
    return [METHODS[s.method] for s in specs if s.method != METHOD_NONE]


def _quantize_blocks(job, source, adapter, factory, recipe, ids, work, out_dtype, progress, log) -> dict:
    tensors_src = source.tensors
    rot = residual_rotation(recipe, source.config)  # model-level rotation: every tensor is read rotated
    if rot is not None:
        tensors_src = RotatedSource(tensors_src, rot, adapter)
    tied_src = bool(getattr(source.config, "tie_word_embeddings", False)) and rot is None  # rotation unties the head
    n_blocks = factory.num_blocks
    n_shards = n_blocks + 1 + int(_writes_head(adapter, recipe, tensors_src, tied_src))
    cdtype = job.calib.torch_dtype()  # the calibration samples' dtype between and inside blocks
    embed = tensors_src.get(adapter.embed + ".weight").to(torch.float32)
    hidden = F.embedding(ids, embed).to(cdtype) if ids is not None else None
    del embed
    release_memory()
    pos_emb = factory.position_embeddings(job.calib.seqlen, cdtype) if ids is not None else None
    all_layers, rows = {}, []
    kill_after = int(os.environ.get("LLMQ_DEBUG_KILL_AFTER_BLOCK", "-1"))  # test hook: simulate a crash
    # test hook "I:PATH": after block I, wait until PATH exists (lets a test act while a run is mid-way)
    hold_after, _, hold_until = os.environ.get("LLMQ_DEBUG_HOLD_AFTER_BLOCK", "-1:").partition(":")

    loop = BlockLoop(adapter, recipe, out_dtype, hidden, pos_emb, job.batch_size, job.passes)
    del hidden
    task = progress.add_task("quantizing blocks", total=n_blocks) if progress else None
    for i in range(n_blocks):
        prefix = adapter.block_prefix(i)
        shard = work / shard_name(i, n_shards)
        if shard.is_file():  # finished by an earlier run of the same job
            tensors, layer_cfgs = load_shard(shard)
            block_rows = json.loads((work / f"report-{i:05d}.json").read_text())
            output = None
        else:
            state = {k[len(prefix):]: tensors_src.get(k) for k in list(tensors_src.keys()) if k.startswith(prefix)}
            block = factory.block(i, state)
            del state
            if hasattr(tensors_src, "release"):
                tensors_src.release(prefix)
            done = loop.run_passes(i, block)
            tensors, layer_cfgs, block_rows, output = done.tensors, done.layer_cfgs, done.rows, done.output
            del block, done
            (work / f"report-{i:05d}.json").write_text(json.dumps(block_rows))
            save_atomic(tensors, shard, metadata={"llmq_layers": json.dumps(layer_cfgs)})
        if loop.hidden is not None:
            loop.advance(None if output is not None else install_quantized(factory.meta_block(i), prefix, tensors, layer_cfgs),
                         output, owned=True)
        del tensors, output
        release_memory()
        all_layers.update(layer_cfgs)
        rows.extend(block_rows)
        if progress:
            progress.advance(task)
        if i == kill_after:
            os.kill(os.getpid(), 9)
        while i == int(hold_after) and not Path(hold_until).exists():
            time.sleep(0.05)

    # Embeddings and final norm in one shard, the head (unless tied) in another: one large tensor each.
    tied = tied_src
    embed_key = adapter.embed + ".weight"
    rest = {embed_key: tensors_src.get(embed_key).to(out_dtype),
            adapter.final_norm + ".weight": tensors_src.get(adapter.final_norm + ".weight").to(out_dtype)}
    save_atomic(rest, work / shard_name(n_blocks, n_shards))
    del rest
    head, head_layer = _head_tensors(adapter, recipe, tensors_src, tied, out_dtype)
    if head_layer:
        all_layers[adapter.head] = head_layer
        tied = False  # the head now differs from the embeddings
    if head:
        save_atomic(head, work / shard_name(n_blocks + 1, n_shards))
    _write_metadata(job, source, work, all_layers, n_shards, tied, out_dtype, log)
    return {"model": source.name, "recipe": recipe.to_dict(), "calib": job.calib.to_dict() if ids is not None else None, "layers": rows}


def _writes_head(adapter, recipe, tensors_src, tied: bool) -> bool:
    untied = (adapter.head + ".weight") in tensors_src.keys() and not tied
    return untied or recipe.spec_for(adapter.head).method != METHOD_NONE


def _head_tensors(adapter, recipe, tensors_src, tied, out_dtype) -> tuple[dict, dict | None]:
    """The head's tensors to write and, if the recipe quantizes it, its layer config."""
    key = adapter.head + ".weight"
    spec = recipe.spec_for(adapter.head)
    if spec.method == METHOD_NONE:
        return ({key: tensors_src.get(key).to(out_dtype)} if key in tensors_src.keys() and not tied else {}), None
    packed, cfg = quantize_head(tensors_src.get(key if key in tensors_src.keys() else adapter.embed + ".weight"), spec,
                                recipe, adapter.head)
    return {f"{adapter.head}.{k}": v for k, v in packed.items()}, cfg


def _write_metadata(job, source, work, layers, n_shards, tied, out_dtype, log) -> None:
    weight_map, total = {}, 0
    for i in range(n_shards):
        name = shard_name(i, n_shards)
        with safe_open(work / name, framework="pt") as f:
            for k in f.keys():
                weight_map[k] = name
        total += (work / name).stat().st_size
    (work / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = source.config.to_dict()
    config["tie_word_embeddings"] = tied
    config["dtype"] = str(out_dtype).replace("torch.", "")
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "llmq_version": __version__,
        "recipe": job.recipe.to_dict(),
        "calibration": job.calib.to_dict() if job.calib.source != "none" else None,
        "layers": layers,
    }
    (work / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    _write_tokenizer(source, work, log)
    for f in work.glob("report-*.json"):
        f.unlink()
    (work / "run.json").unlink(missing_ok=True)


def _write_tokenizer(source: ModelSource, work: Path, log) -> None:
    """The source's tokenizer files; for a GGUF without them, the tokenizer (vocabulary, merges, special
    tokens, chat template) that transformers builds from the GGUF's metadata."""
    files = source.tokenizer_files()
    for f in files:
        shutil.copy2(f, work / f.name)
    if any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for f in files):
        return
    if source.gguf is None:
        log(f"warning: {source.dir} has no tokenizer files; the checkpoint has none (eval needs one beside it)")
        return
    source.tokenizer().save_pretrained(work)
