"""Checkpoint reports; kept in :mod:`torchquant.tools.inspection`."""

from torchquant.tools.inspection import CheckpointReport, inspect_checkpoint, report_model

__all__ = ["CheckpointReport", "inspect_checkpoint", "report_model"]
