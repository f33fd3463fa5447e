"""The conversion's one exception (no heavy imports: the command line catches it)."""

from __future__ import annotations


class ConversionError(ValueError):
    """The inputs cannot be converted; the message says which input and what is wrong."""
