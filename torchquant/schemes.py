"""Scheme shorthands (``w4a16``, ``w8a8``, ``fp8`` ...), kept in :mod:`torchquant.config.scheme`."""

from torchquant.config.scheme import DEFAULT_GROUP_SIZE, SCHEME_NAMES, scheme_from_name

__all__ = ["DEFAULT_GROUP_SIZE", "SCHEME_NAMES", "scheme_from_name"]
