"""Invalid settings said plainly: the service's and the bridge's, one line each."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError

__all__ = ["describe_errors", "without_credentials"]

_SECRET_WORDS = ("key", "token", "secret", "password")
"""A setting whose name holds one of these is never shown back (``api_keys``, ``token_secret``, …)."""


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
        got = f" (got {_shown(name, given)})" if place is not None else ""
        lines.append(f"  {place or 'settings'}: {'; or '.join(messages)}{got}")
    return "\n".join(lines)


def _shown(name: str, given: object) -> str:
    """What a setting got, as an error may show it: never a secret, nor a URL's user and password."""
    if any(word in name for word in _SECRET_WORDS) and not name.endswith("_file"):
        return "a value not shown"
    if isinstance(given, str):
        return repr(without_credentials(given))
    return repr(given)


def without_credentials(url: str) -> str:
    """``url`` without its user and password (``redis://***@host:6379/0``): as an error may show it."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if not sep or "@" not in netloc:
        return url
    return f"{scheme}://***@{netloc.rsplit('@', 1)[1]}{slash}{path}"
