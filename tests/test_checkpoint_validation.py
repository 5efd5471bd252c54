"""One validator (llmq.checkpoint) for `llmq inspect`, `llmq export` and `llmq eval`: a damaged or too-new llmq
checkpoint is refused with exit code 2 and exactly one stderr line naming the file or tensor, and an export
leaves neither its destination nor a partial folder behind."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from test_cli_errors import run_cli

LAYER = "model.layers.1.self_attn.q_proj"  # in_features 96, group size 32: scales F16 [96, 3]


@pytest.fixture(scope="module")
def ckpt(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "q"
    p = run_cli("quantize", tiny_model, "-o", out, "--calib", "none", "--bits", 4, "--group-size", 32, "--sym")
    assert p.returncode == 0, p.stderr[-2000:]
    return out


@pytest.fixture()
def copy(ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    return dst


def shard_of(folder, tensor):
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def rewrite_shard(folder, change):
    f = shard_of(folder, f"{LAYER}.scales")
    t = load_file(f)
    change(t)
    save_file(t, f, metadata={"format": "pt"})


def edit_layer(d, change):
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["layers"][LAYER].update(change)
    (d / "config.json").write_text(json.dumps(cfg))


def missing_shard(d):
    shard_of(d, f"{LAYER}.scales").unlink()


def missing_tensor(d):
    rewrite_shard(d, lambda t: t.pop(f"{LAYER}.scales"))


def truncated_shard(d):
    f = shard_of(d, f"{LAYER}.scales")
    f.write_bytes(f.read_bytes()[:-100])


def wrong_shape(d):
    rewrite_shard(d, lambda t: t.update({f"{LAYER}.scales": t[f"{LAYER}.scales"][:, :2].contiguous()}))


def format_version_99(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))


DAMAGES = {  # damage -> words the error line must contain
    "missing_shard": (missing_shard, ["missing", "model-00002-of-00004.safetensors"]),
    "missing_tensor": (missing_tensor, ["missing", f"{LAYER}.scales"]),
    "truncated_shard": (truncated_shard, ["truncated", "model-00002-of-00004.safetensors"]),
    "wrong_shape": (wrong_shape, [f"{LAYER}.scales", "[96, 2]", "[96, 3]"]),
    "format_version_99": (format_version_99, ["format version 99"]),
}


def assert_one_error_line(p, *words):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmq: error:"), p.stderr[-2000:]
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


def assert_nothing_written(dest):
    assert not dest.exists()
    assert not list(dest.parent.glob(f".{dest.name}*"))


@pytest.mark.parametrize("command", ["inspect", "export", "eval"])
@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_checkpoint_is_refused(copy, tmp_path, damage, command):
    fn, words = DAMAGES[damage]
    fn(copy)
    dest = tmp_path / "exported"
    args = {"inspect": ["inspect", copy], "export": ["export", copy, "-o", dest, "--format", "compressed-tensors"],
            "eval": ["eval", copy, "--limit", 1, "--seqlen", 32]}[command]
    p = run_cli(*args)
    assert_one_error_line(p, *words)
    assert p.stdout == ""
    assert_nothing_written(dest)


def test_valid_checkpoint_inspects_and_exports(ckpt, tmp_path):
    p = run_cli("inspect", ckpt)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "4.500 bits/weight" in p.stdout  # 4-bit codes + one fp16 scale per 32 weights
    dest = tmp_path / "ct"
    p = run_cli("export", ckpt, "-o", dest, "--format", "compressed-tensors")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "exported 21 layers" in p.stdout and (dest / "config.json").is_file() and (dest / "llmq_export.json").is_file()
    assert not list(tmp_path.glob(".ct*"))
    p = run_cli("export", ckpt, "-o", dest, "--overwrite")  # an earlier llmq export may be replaced
    assert p.returncode == 0, p.stderr[-2000:]
    assert not list(tmp_path.glob(".ct*"))


def test_export_overwrites_only_an_llmq_export(ckpt, tmp_path):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    for extra in ([], ["--overwrite"]):
        p = run_cli("export", ckpt, "-o", dest, *extra)
        assert_one_error_line(p, str(dest))
        assert (dest / "keep.txt").read_text() == "x" and sorted(dest.iterdir()) == [dest / "keep.txt"]
        assert not list(tmp_path.glob(".mine*"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("export", ckpt, "-o", empty, "--overwrite").returncode == 0
    assert (empty / "llmq_export.json").is_file()


def test_export_refuses_destination_overlapping_the_checkpoint(copy):
    before = sorted(p.name for p in copy.iterdir())
    for dest in (copy, copy / "inside", copy.parent):
        assert_one_error_line(run_cli("export", copy, "-o", dest, "--overwrite"), "checkpoint")
        assert sorted(p.name for p in copy.iterdir()) == before
    assert not list(copy.parent.glob(".*partial"))


def test_eval_without_tokenizer(copy):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (copy / f).unlink()
    assert_one_error_line(run_cli("eval", copy, "--limit", 1, "--seqlen", 32), "no tokenizer", str(copy))


@pytest.mark.parametrize("damage,words", [
    (lambda d: rewrite_shard(d, lambda t: t.update({f"{LAYER}.scales": t[f"{LAYER}.scales"].float()})), ["dtype F32", "dtype F16"]),
    (lambda d: rewrite_shard(d, lambda t: t.update({f"{LAYER}.qzeros": t[f"{LAYER}.scales"].byte()})), [f"{LAYER}.qzeros", "not part"]),
    (lambda d: edit_layer(d, {"format": "nosuch"}), [LAYER, "nosuch"]),
    (lambda d: edit_layer(d, {"bits": 3}), [f"{LAYER}.qweight", "shape"]),
])
def test_validator_checks_each_layer_against_its_format(copy, damage, words):
    """In process (no CLI start-up): dtype, a tensor the format does not have, the layer config itself."""
    from llmq.checkpoint import validate_checkpoint
    from llmq.errors import InputError

    validate_checkpoint(copy)
    damage(copy)
    with pytest.raises(InputError) as e:
        validate_checkpoint(copy)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
