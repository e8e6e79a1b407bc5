"""Triton kernels for torchquant, installed as ``torchquant.triton_kernels``.

This folder imports only ``torch`` and ``triton``.  The maths lives once, in the ops'
exact references (``torchquant.ops``, built on ``torchquant.numerics``): every kernel
here is tested against them, none keeps a PyTorch copy of its own.
"""
