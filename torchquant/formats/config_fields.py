"""Typed reads of the JSON ``quantization_config`` that other libraries write (GPTQ, AWQ).

Each format lists every field it knows in a :class:`FieldTable`: fields it reads
(they decide how the tensors are read) and fields it ignores, each with the reason.
A field outside the table is refused, since a field nobody here has read may change
what the tensors mean.  Every value is type-checked, so a malformed config is one
:class:`CheckpointError` naming the field, never a raw ``TypeError`` from deeper down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torchquant.errors import CheckpointError

MISSING: Any = object()


@dataclass(frozen=True)
class FieldTable:
    """Every field of one format's config: ``read`` (what it decides) and ``ignored`` (why)."""

    format_name: str
    read: Mapping[str, str]
    ignored: Mapping[str, str]

    def where(self, field: str) -> str:
        return f"{self.format_name} quantization_config.{field}"

    def check_object(self, qc: object) -> dict[str, Any]:
        """``qc`` as a dict, refusing a non-object and any field the table does not list."""
        if not isinstance(qc, dict):
            raise CheckpointError(
                f"{self.format_name} quantization_config must be an object, got {type(qc).__name__}"
            )
        unknown = sorted(set(qc) - set(self.read) - set(self.ignored))
        if unknown:
            raise CheckpointError(
                f"{self.format_name} quantization_config: unknown field(s) {unknown}, which "
                f"may change what the tensors mean; this torchquant understands "
                f"{sorted(self.read)} and ignores {sorted(self.ignored)}"
            )
        return qc

    def _bad(self, field: str, value: object, expected: str) -> CheckpointError:
        return CheckpointError(f"{self.where(field)}={value!r}: expected {expected}")

    def _present(self, qc: dict[str, Any], field: str, default: Any) -> Any:
        """The field's value, or ``default``; an error when neither is there."""
        value = qc.get(field, default)
        if value is MISSING:
            raise CheckpointError(f"{self.where(field)} is missing")
        return value

    def int_field(self, qc: dict[str, Any], field: str, default: Any = MISSING) -> int:
        """An int (not a bool, not a float such as ``4.0``)."""
        value = self._present(qc, field, default)
        if type(value) is not int:
            raise self._bad(field, value, f"an int, got {type(value).__name__}")
        if not -(2**31) <= value < 2**31:  # bits, group sizes: nothing real is this large
            raise self._bad(field, value, "an int within 32 bits")
        return value

    def bool_field(self, qc: dict[str, Any], field: str, default: Any = MISSING) -> bool:
        """A JSON boolean (``0``/``1`` are refused: a writer that meant a flag writes one)."""
        value = self._present(qc, field, default)
        if type(value) is not bool:
            raise self._bad(field, value, f"true or false, got {type(value).__name__}")
        return value

    def optional_bool(self, qc: dict[str, Any], field: str) -> bool | None:
        """A boolean, or ``None`` when absent or null."""
        return None if qc.get(field) is None else self.bool_field(qc, field)

    def str_field(
        self, qc: dict[str, Any], field: str, choices: tuple[str, ...], default: Any = MISSING
    ) -> str:
        """One of ``choices``, compared case-insensitively (AutoAWQ wrote ``"GEMM"``)."""
        value = self._present(qc, field, default)
        if not isinstance(value, str) or value.lower() not in choices:
            raise self._bad(field, value, f"one of {list(choices)}")
        return value.lower()

    def str_list(self, qc: dict[str, Any], field: str) -> list[str]:
        """A list of strings; absent or null reads as empty."""
        value = qc.get(field)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(field, value, "a list of strings or null")
        return value

    def empty_or_null(self, qc: dict[str, Any], field: str, meaning: str) -> None:
        """Refuse a field that would change the weights when set (``meaning`` says how)."""
        value = qc.get(field)
        if value not in (None, False, {}, []):
            raise CheckpointError(
                f"{self.where(field)}={value!r}: {meaning}, which this torchquant does not support"
            )

    def synonyms(self, qc: dict[str, Any], fields: tuple[str, ...], read: Any) -> Any:
        """The value of whichever of ``fields`` are present (they must agree), else ``MISSING``.

        ``read(field)`` type-checks one field; libraries name the same fact differently
        (AutoAWQ ``w_bit`` and ``bits``, GPTQModel ``format`` and ``checkpoint_format``).
        """
        values = {f: read(f) for f in fields if f in qc}
        if len(set(values.values())) > 1:
            raise CheckpointError(
                f"{self.format_name} quantization_config: {values} name the same setting "
                "with different values"
            )
        return next(iter(values.values()), MISSING)
