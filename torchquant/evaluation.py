"""Perplexity; kept in :mod:`torchquant.tools.evaluation`."""

from torchquant.tools.evaluation import PerplexityResult, perplexity, tokenize_text

__all__ = ["PerplexityResult", "perplexity", "tokenize_text"]
