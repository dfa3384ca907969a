"""Invalid settings said plainly: the service's and the bridge's, one line each."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError

__all__ = ["describe_errors"]


def describe_errors(error: ValidationError, where: Callable[[str], str | None]) -> str:
    """One line per invalid setting: where it is set (``where(field)``: its flag and its variable, or
    None for a rule across settings), what is wrong, and what it got. A setting of several types
    (``workers``: a number or ``auto``) gets one line saying each."""
    wrong: dict[str, tuple[list[str], object]] = {}
    for item in error.errors():
        name = str(item["loc"][0]) if item["loc"] else ""
        message = str(item["ctx"]["error"]) if item["type"] == "value_error" else item["msg"]
        messages, _ = wrong.setdefault(name, ([], item.get("input")))
        messages.append(message)
    lines = []
    for name, (messages, given) in wrong.items():
        place = where(name) if name else None
        got = f" (got {given!r})" if place is not None else ""
        lines.append(f"  {place or 'settings'}: {'; or '.join(messages)}{got}")
    return "\n".join(lines)
