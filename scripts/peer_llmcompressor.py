"""Peer run for scripts/bench_gptq.py: llm-compressor's GPTQModifier on the same model and the same
calibration token windows, then the same llmq perplexity function on the resulting model object.
Usage: python peer_llmcompressor.py FP_DIR CALIB_PT BITS GROUP LIMIT OUT_JSON [--no-act-order] [--bf16]
Default: GPTQModifier's own default, static act-order (stated explicitly below). --bf16 loads the model in
bf16 (llm-compressor then calibrates in bf16, as llmq does by default on CPUs with native bf16); the
result is evaluated in fp32 like every other row."""

import json
import os
import resource
import sys
import time

T0 = time.time()

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.quantization import GPTQModifier  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main():
    fp_dir, calib_pt, bits, group, limit, out_json = sys.argv[1:7]
    act_order = "--no-act-order" not in sys.argv
    ids = torch.load(calib_pt)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    dtype = torch.bfloat16 if "--bf16" in sys.argv else torch.float32
    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=dtype)
    weights = {"num_bits": int(bits), "type": "int", "symmetric": True, "strategy": "group", "group_size": int(group)}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"], actorder="static" if act_order else None,
                          block_size=128, dampening_frac=0.01)
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0],
            shuffle_calibration_samples=False)
    quant_seconds = time.time() - T0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    peak_rss, cpu_seconds, load_after = ru.ru_maxrss * 1024, ru.ru_utime + ru.ru_stime, os.getloadavg()[0]

    from llmq.eval.perplexity import perplexity

    tok = AutoTokenizer.from_pretrained(fp_dir)
    r = perplexity(model.float().eval(), tok, "wikitext2", seqlen=2048, limit=int(limit))
    json.dump({"quant_seconds": quant_seconds, "cpu_seconds": cpu_seconds, "load_after": load_after, "peak_rss_bytes": peak_rss, "ppl": r.ppl, "protocol": r.protocol(),
               "dtype": str(dtype).replace("torch.", "")}, open(out_json, "w"))


if __name__ == "__main__":
    main()
