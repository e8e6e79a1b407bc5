"""The act-order INTn op by its former module; it lives with its family in ``weight_int``."""

from torchquant.ops.weight_int import linear_intn_gidx

__all__ = ["linear_intn_gidx"]
