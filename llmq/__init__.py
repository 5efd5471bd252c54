"""llmq: post-training weight quantization for large language models.

Importing llmq registers the "llmq" quantization method with transformers, so
`AutoModelForCausalLM.from_pretrained(llmq_checkpoint)` builds packed `LlmqLinear` layers.
"""

__version__ = "0.1.0"

import os as _os  # noqa: E402
import signal as _signal  # noqa: E402
import sys as _sys  # noqa: E402

if _sys.argv and _os.path.basename(_sys.argv[0]) == "llmq":
    # the console script: Ctrl-C while torch and transformers load is one line, not an import traceback
    # (llmq.cli.main restores the usual KeyboardInterrupt once the commands run)
    _signal.signal(_signal.SIGINT, lambda *_: (_sys.stderr.write("llmq: interrupted\n"), _os._exit(130)))

from . import hf  # noqa: E402,F401  (registers the transformers quantizer)
from .recipe import LayerSpec, Recipe  # noqa: E402

__all__ = ["LayerSpec", "Recipe", "__version__"]
