"""Evaluation (perplexity, KL, zero-shot), installed as ``llmq.eval`` (never a top-level import)."""
