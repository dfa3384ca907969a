"""Invalid settings said plainly: the service's and the bridge's, one line each."""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Callable, Collection, Mapping

from pydantic import BaseModel, ValidationError, ValidationInfo, field_validator

__all__ = [
    "BRIDGE_PREFIXES",
    "ChoicesInAnyCase",
    "choice_in_any_case",
    "describe_errors",
    "unknown_variables",
    "without_credentials",
]

_SECRET_WORDS = frozenset({"key", "keys", "token", "secret", "password"})
"""A setting one of whose ``_``-separated words is one of these (``api_keys``, ``token_secret``, but not
``llm_max_tokens``) is never shown back."""


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


BRIDGE_PREFIXES = ("PARLEY_BRIDGE_", "PARLEY_GRPC_", "PARLEY_TWILIO_")
"""The bridge's own variables begin so; the service's never do (each program checks its own names)."""


def unknown_variables(
    environ: Mapping[str, str],
    known: Collection[str],
    *,
    case_sensitive: bool,
    mine: tuple[str, ...] = ("PARLEY_",),
    others: tuple[str, ...] = (),
    reader: str = "Parley",
) -> list[str]:
    """One line for each variable whose name begins with one of ``mine`` (in any case), not with one of
    ``others`` (another program's, which checks them itself), and that is not in ``known``: a
    misspelled setting is otherwise ignored without a word. ``case_sensitive``: whether the program
    reads a variable only by its exact name (``parley_port`` is then not ``PARLEY_PORT``); ``reader``: who
    does not read it, as the line says."""
    lines = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(mine) or upper.startswith(others):
            continue
        if (name if case_sensitive else upper) in known:
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        lines.append(f"{name} is not a variable {reader} reads; it is ignored{hint}")
    return lines


def _shown(name: str, given: object) -> str:
    """What a setting got, as an error may show it: never a secret, nor a URL's user and password."""
    words = name.split("_")
    if _SECRET_WORDS.intersection(words) and words[-1] != "file":
        return "a value not shown"
    if isinstance(given, str):
        return repr(without_credentials(given))
    return repr(given)


def without_credentials(url: str) -> str:
    """``url`` without its user and password (``redis://***@host:6379/0``), and with the value of a
    ``password`` query parameter hidden: as an error or a log line may show it. Everything before the
    last ``@`` ahead of the query counts as the user and password, even with a ``/`` in it (generated
    passwords hold them)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    head, mark, query = rest.partition("?")
    if "@" in head:
        head = "***@" + head.rsplit("@", 1)[1]
    query = _PASSWORD_PARAMETER.sub(r"\1***", query)
    return f"{scheme}://{head}{mark}{query}"


_PASSWORD_PARAMETER = re.compile(r"((?:^|&)password=)[^&#]*", re.IGNORECASE)


def choice_in_any_case(annotation: object, value: object) -> object:
    """``value`` as the choice of ``annotation`` (a ``Literal``, or a union holding one) it names in
    another case, or as it is: ``PARLEY_LOG_LEVEL=debug`` is ``DEBUG``, ``PARLEY_LLM=OpenAI`` is
    ``openai`` (a variable's case is seldom what an operator remembers)."""
    if not isinstance(value, str):
        return value
    choices: list[str] = []
    pending = [annotation]
    while pending:
        kind = pending.pop()
        if typing.get_origin(kind) is typing.Literal:
            choices += [choice for choice in typing.get_args(kind) if isinstance(choice, str)]
        else:
            pending += typing.get_args(kind)
    folded = value.strip().casefold()
    return next((choice for choice in choices if choice.casefold() == folded), value)


class ChoicesInAnyCase(BaseModel):
    """Settings whose choices (``Literal`` fields) are taken in any case (see :func:`choice_in_any_case`):
    the service's and the bridge's."""

    @field_validator("*", mode="before")
    @classmethod
    def _choices_in_any_case(cls, value: object, info: ValidationInfo) -> object:
        field = cls.model_fields.get(info.field_name or "")
        return value if field is None else choice_in_any_case(field.annotation, value)
