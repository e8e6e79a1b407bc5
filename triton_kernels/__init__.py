"""Triton kernels for torchquant, installed as ``torchquant.triton_kernels``.

This folder imports only ``torch`` and ``triton``; each kernel family has a
plain-PyTorch twin with the same signature for CPU and for tests.
"""
