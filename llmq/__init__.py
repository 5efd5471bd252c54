"""llmq: post-training weight quantization for large language models.

Importing llmq registers the "llmq" quantization method with transformers, so
`AutoModelForCausalLM.from_pretrained(llmq_checkpoint)` builds packed `LlmqLinear` layers.
"""

__version__ = "0.1.0"

from . import hf  # noqa: E402,F401  (registers the transformers quantizer)
from .recipe import LayerSpec, Recipe  # noqa: E402

__all__ = ["LayerSpec", "Recipe", "__version__"]
