"""KEY=VALUE arguments (repeatable --label), as the snapshot and layer commands take them."""

from __future__ import annotations

from ..errors import InvalidInput


def parse_labels(items: list[str] | None) -> dict[str, str]:
    """KEY=VALUE arguments as a dict; a malformed one is a one-line error."""
    out: dict[str, str] = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not k or not sep:
            raise InvalidInput(f"bad label {item!r}: expected KEY=VALUE")
        out[k] = v
    return out
