"""Moved to llmq.transforms.hadamard (formats use the transforms without importing the rotation package); this name
stays importable and is the same module."""

import sys

from ..transforms import hadamard as _impl

sys.modules[__name__] = _impl
