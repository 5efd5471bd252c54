"""lm-evaluation-harness adapter: evaluate any model llmq loads (llmq checkpoint, Hugging Face folder, GGUF
folder) with lm-eval's full task list.

    pip install "lm-eval>=0.4,<0.5"
    python -m llmq.eval.lm_eval_adapter run --model llmq --model_args pretrained=out/ckpt,dtype=fp32 --tasks piqa,arc_easy

The arguments after the module name are lm-eval's own command line (this module only registers the model
type "llmq" first); in Python, `import llmq.eval.lm_eval_adapter` then use `model="llmq"` with
`lm_eval.simple_evaluate`, or pass `LlmqLM(pretrained=...)` as the model. The class is lm-eval's `HFLM` built
around the already loaded model, so scoring, batching and truncation are exactly lm-eval's.
"""

from __future__ import annotations

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - only without the optional dependency
    raise ImportError('llmq.eval.lm_eval_adapter needs lm-evaluation-harness: pip install "lm-eval>=0.4,<0.5"') from e


@register_model("llmq")
class LlmqLM(HFLM):
    def __init__(self, pretrained: str, dtype: str = "fp32", **kwargs):
        import torch

        from llmq.loading import load_causal_lm

        torch_dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[str(dtype)]
        model, tok, _ = load_causal_lm(str(pretrained), torch_dtype)
        kwargs.pop("tokenizer", None)
        super().__init__(pretrained=model, tokenizer=tok, **kwargs)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
