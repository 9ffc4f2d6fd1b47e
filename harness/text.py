"""How values read in the terminal and in tables."""

from __future__ import annotations

from typing import Any


def format_value(value: Any, digits: int = 4) -> str:
    """Floats to `digits` significant digits, the rest as they print."""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)
