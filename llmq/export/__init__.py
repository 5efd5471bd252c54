"""Exporters from llmq checkpoints to formats other runtimes load without llmq."""

EXPORT_FORMATS = ("compressed-tensors",)
