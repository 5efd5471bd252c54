"""transformers integration: after `import llmq`, `AutoModelForCausalLM.from_pretrained(llmq_checkpoint)`
builds `LlmqLinear` modules for the layers the checkpoint lists and loads the packed tensors into them.

Without `import llmq`, transformers would skip an unknown `quant_method` with a warning and load random
weights. To make that fail loudly instead, every quantized layer also carries a zero-length `p.weight`
placeholder (a buffer of `LlmqLinear`): a plain model then stops with a size-mismatch error naming it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .modules import LlmqLinear, set_submodule

QUANT_METHOD = "llmq"


@register_quantization_config(QUANT_METHOD)
class LlmqConfig(QuantizationConfigMixin):
    def __init__(self, format_version: int = 1, layers: dict | None = None, recipe: dict | None = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.layers = layers or {}
        self.recipe = recipe or {}
        for k, v in kwargs.items():
            setattr(self, k, v)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@register_quantizer(QUANT_METHOD)
class LlmqHfQuantizer(HfQuantizer):
    requires_calibration = True  # llmq checkpoints are made by `llmq quantize`, not at load time

    def validate_environment(self, *args, **kwargs):
        from .checkpoint import check_format_version

        check_format_version(self.quantization_config.format_version)

    def _process_model_before_weight_loading(self, model, **kwargs):
        layers = self.quantization_config.layers
        for name, cfg in layers.items():
            old = model.get_submodule(name)
            with torch.device("meta"):
                new = LlmqLinear(cfg, bias=getattr(old, "bias", None) is not None)
            set_submodule(model, name, new)

    def _process_model_after_weight_loading(self, model, **kwargs):
        missing = [
            f"{name}.{b}"
            for name in self.quantization_config.layers
            for b, t in model.get_submodule(name).named_buffers(recurse=False)
            if not getattr(t, "_is_hf_initialized", False) or t.is_meta
        ]
        if missing:
            raise ValueError(f"llmq checkpoint is incomplete: {len(missing)} packed tensors missing, e.g. {missing[:3]}")
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
