"""A checkpoint quantized from a GGUF alone in its folder carries the GGUF's tokenizer and chat template."""

import os
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from conftest import DATA, SMOLLM

GGUF = SMOLLM / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(not GGUF.is_file(), reason="needs the shared SmolLM2 GGUF")
def test_checkpoint_from_a_lone_gguf_has_its_tokenizer_and_chat_template(tmp_path):
    lone = tmp_path / "gguf-only"
    lone.mkdir()
    shutil.copy(GGUF, lone / GGUF.name)  # a copy, not a link: nothing of the original folder is reachable
    out = tmp_path / "q"
    env = {**os.environ, "LLMQ_DATA_DIR": str(DATA), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "llmq.cli", "quantize", lone, "-o", out, "--method", "rtn", "--bits", "8",
                        "--group-size", "64", "--calib", "none"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "tokenizer.json").is_file()

    mine, original = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(SMOLLM)
    text = (DATA / "wikitext-2-raw" / "wiki.test.raw").read_text()[:50_000]
    assert mine(text).input_ids == original(text).input_ids  # so perplexity is scored on the same tokens
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    rendered = mine.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == original.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert (mine.bos_token, mine.eos_token) == (original.bos_token, original.eos_token)
