"""Evaluation: perplexity (and later zero-shot tasks) of a (sparse) model."""

from compressor.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
