import atexit
import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMQ_SHARED", REPO.parent / "shared"))
SMOLLM = SHARED / "models" / "smollm2-135m-instruct-q4_1"
DATA = SHARED / "data"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]


def make_tiny_llama(folder: Path, layers: int = 3, hidden: int = 96, inter: int = 160, tie: bool = True, seed: int = 0,
                    dtype=torch.float32) -> Path:
    """A small random Llama that uses SmolLM2's real tokenizer. hidden 96 is not a multiple of 64, so
    group size 64 exercises a shorter last group."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=1024,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # non-trivial norms and some outliers, like a trained model
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() == 2:
                p.normal_(0, 0.05)
                p[torch.rand_like(p) < 0.002] *= 8
    model.save_pretrained(folder)
    for f in TOKENIZER_FILES:
        shutil.copy(SMOLLM / f, folder / f)
    return folder


def toy(n: int = 32, k: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A small random weight [n, k] and a calibration Hessian for it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(128, k, generator=g)
    return w, x.T @ x / 128


def tensors_of(folder: Path) -> dict:
    """Every tensor of a checkpoint folder, by name."""
    from safetensors import safe_open

    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        with safe_open(p, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def spy_kernel(monkeypatch, fmt: str) -> list:
    """Count the calls of the Triton kernel registered for `fmt` (llmq.kernels.registry)."""
    from llmq.kernels.registry import KERNELS, kernel_for

    orig, calls = kernel_for(fmt), []
    monkeypatch.setitem(KERNELS, (fmt, "triton"), lambda *a, **k: calls.append(1) or orig(*a, **k))
    return calls


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def ids():
    """Calibration token ids (4 × 64 from the shared c4 sample): calibration for tiny_model, and inputs for logits."""
    from transformers import AutoTokenizer

    from llmq.calib import CalibConfig, calibration_ids

    return calibration_ids(CalibConfig("c4", nsamples=4, seqlen=64, seed=0, data_dir=str(DATA)), AutoTokenizer.from_pretrained(SMOLLM))


@pytest.fixture(autouse=True)
def _data_dir(monkeypatch):
    monkeypatch.setenv("LLMQ_DATA_DIR", str(DATA))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")



@atexit.register  # after pytest has restored its captured stderr, before the interpreter shuts down
def _silence_stderr_at_exit():
    """Triton's bindings (nanobind), which torch imports, report "leaked" objects on stderr while the interpreter
    shuts down, after pytest's closing line: noise from the binding, silenced so the summary stays last."""
    import sys

    sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
