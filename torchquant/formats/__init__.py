"""Checkpoint formats shared with other tools: compressed-tensors, GPTQ and AWQ."""
