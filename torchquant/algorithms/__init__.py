"""Algorithms as pure functions on tensors (GPTQ, AWQ, SmoothQuant) and ``quantize_weight``,
the one entry that rounds a weight for every algorithm (:mod:`.quantize`)."""
