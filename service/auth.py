"""Who may call: API keys, checked on every RPC but the health service's.

Keys come from ``PARLEY_API_KEYS_FILE`` (one per line, ``#`` comments, ``name:key`` or a bare key) and
``PARLEY_API_KEYS`` (the same, comma-separated). A client sends ``authorization: Bearer <key>``. A
missing and a wrong key get the same UNAUTHENTICATED message; every configured key is compared, in
constant time, whatever matched; a key is never logged or echoed (its name is, and names the
*principal* that owns the sessions it creates). The file is read again when it changes (checked at
most once a second, on a call), so keys are added and revoked without a restart; a file that no
longer parses keeps the keys that were loaded, and says why in the log.

**Client tokens** (:class:`Authenticator`): a caller with an API key mints a short-lived token
(``CreateClientToken``) for a browser or an app, which then calls ``Converse`` with it in place of a
key. A token is a JWT signed with HS256 and ``PARLEY_TOKEN_SECRET`` (every replica needs the same
secret), with an expiry of at most an hour, the minting key's name and a subject (whose sessions
are theirs), and an optional scope: the voices it may use, the one session it may resume, the
streams it may hold at once. Verification accepts only HS256 with this secret, requires every claim,
and rejects an expired token: a forged signature, ``alg: none`` and another secret all fail alike.

``python -m service.auth`` prints a new random key.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt

from service.core.settings import TokenScope
from service.logs import Throttled

__all__ = [
    "CALLER",
    "MAX_TOKEN_TTL_S",
    "MIN_KEY_CHARS",
    "MIN_SECRET_CHARS",
    "UNAUTHENTICATED_MESSAGE",
    "AuthInterceptor",
    "Authenticator",
    "Caller",
    "KeyRing",
    "TokenError",
    "TokenScope",
    "new_key",
]

log = logging.getLogger(__name__)
_log_refusal = Throttled(log, logging.INFO)  # (anyone may cause it, at will)

MIN_KEY_CHARS = 24
UNAUTHENTICATED_MESSAGE = (
    "missing or invalid credentials: send the metadata authorization: Bearer <API key or client token>"
)
MIN_SECRET_CHARS = 32
MAX_TOKEN_TTL_S = 3600
DEFAULT_TOKEN_TTL_S = 300
_ISSUER = _AUDIENCE = "parley"
_SUBJECT = re.compile(r"[A-Za-z0-9_.@-]{1,128}")
_KEY_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_RELOAD_EVERY_S = 1.0
_HEALTH = "/grpc.health.v1.Health/"
_REFLECTION = "/grpc.reflection."
_VOICE = "/parley.v1.VoiceService/"


class KeyError_(ValueError):
    """A key list that cannot be used (the message names the line, never the key)."""


@dataclass(frozen=True)
class _Key:
    name: str
    digest: bytes  # SHA-256 of the key: compared instead of the key, so every comparison is the same length


def parse_keys(text: str, where: str) -> list[_Key]:
    """Keys from lines (or comma-separated entries) of ``name:key`` or ``key``. Raises KeyError_."""
    keys: list[_Key] = []
    for number, raw in enumerate(text.replace(",", "\n").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, key = line.rpartition(":")
        name, key = name.strip(), key.strip()
        if name and not _KEY_NAME.fullmatch(name):
            raise KeyError_(f"{where}, entry {number}: a key's name is 1 to 64 letters, digits, '-', '_', '.' or '@'")
        if len(key) < MIN_KEY_CHARS:
            raise KeyError_(
                f"{where}, entry {number}: a key must have at least {MIN_KEY_CHARS} characters "
                "(python -m service.auth prints a good one)"
            )
        digest = hashlib.sha256(key.encode()).digest()
        keys.append(_Key(name or f"key-{digest.hex()[:8]}", digest))
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise KeyError_(f"{where}: two keys have the same name")
    return keys


def _check_unique(inline: list[_Key], from_file: list[_Key]) -> None:
    names = [k.name for k in (*inline, *from_file)]
    if len(set(names)) != len(names):
        raise KeyError_("PARLEY_API_KEYS and the keys file name the same key twice")


class KeyRing:
    """The configured keys; :meth:`check` says whose a presented key is."""

    def __init__(self, path: Path | None = None, inline: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self._path = path
        self._inline = parse_keys(inline, "PARLEY_API_KEYS") if inline else []
        self._clock = clock
        self._from_file: list[_Key] = []
        self._mtime: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        if path is not None:
            self._from_file = self._read(path)
            _check_unique(self._inline, self._from_file)

    @property
    def enabled(self) -> bool:
        return bool(self._inline or self._from_file or self._path is not None)

    @property
    def names(self) -> list[str]:
        return [k.name for k in (*self._inline, *self._from_file)]

    def has(self, name: str) -> bool:
        """Whether a key of that name is configured (now: the file is looked at first)."""
        self._reload_if_changed()
        return name in self.names

    def check(self, presented: str) -> str | None:
        """The name of the key ``presented`` is, or None. Compares with every key, in constant time."""
        self._reload_if_changed()
        digest = hashlib.sha256(presented.encode()).digest()
        found: str | None = None
        for key in (*self._inline, *self._from_file):
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key.name
        return found

    def _reload_if_changed(self) -> None:
        if self._path is None or self._clock() - self._checked_at < _RELOAD_EVERY_S:
            return
        self._checked_at = self._clock()
        try:
            stat = self._path.stat()
            mtime = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError as error:
            log.error("API keys file %s cannot be read (%s); keeping the keys loaded", self._path, error.strerror)
            return
        if mtime == self._mtime:
            return
        try:
            keys = self._read(self._path)
            _check_unique(self._inline, keys)
            self._from_file = keys
        except (KeyError_, OSError) as error:
            log.error("API keys file not reloaded (%s); keeping the keys loaded before", error)
            return
        log.info("API keys reloaded from %s: %s", self._path, ", ".join(self.names) or "none")

    def _read(self, path: Path) -> list[_Key]:
        try:
            stat = path.stat()
            self._mtime = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            return parse_keys(path.read_text(encoding="utf-8"), str(path))
        except OSError as error:
            raise KeyError_(f"cannot read the API keys file {path}: {error.strerror}") from error


class TokenError(ValueError):
    """A token cannot be minted as asked (the message says what to change)."""


@dataclass(frozen=True)
class Caller:
    """Who a call comes from."""

    principal: str
    """``key:<name>``, or ``key:<name>/<subject>`` for a client token."""
    token: TokenScope | None = None
    """None: an API key."""

    @property
    def key_principal(self) -> str:
        """The API key's own principal (a token's minting key): whose quotas it counts against."""
        return self.principal.split("/", 1)[0]


CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("parley_caller", default=None)
"""Who the current call comes from, set by :class:`AuthInterceptor` for the call's handler (the
credentials are checked once per call: a token expiring or a key revoked mid-call changes nothing)."""


class Authenticator:
    """API keys and the client tokens minted with them."""

    def __init__(self, keys: KeyRing, token_secret: str = "", clock: Callable[[], float] = time.time) -> None:
        if token_secret and len(token_secret) < MIN_SECRET_CHARS:
            raise TokenError(f"the token secret must have at least {MIN_SECRET_CHARS} characters")
        self.keys = keys
        self._secret = token_secret
        self._clock = clock

    @property
    def mints_tokens(self) -> bool:
        return bool(self._secret)

    def caller(self, metadata: Sequence[tuple[str, Any]] | None) -> Caller | None:
        """Who the call's ``authorization`` metadata says it is; None when nothing valid is there."""
        credential = _bearer(metadata)
        if credential is None:
            return None
        if credential.count(".") == 2 and self._secret:  # a JWT: header.payload.signature
            caller = self._verify(credential)
            if caller is not None:
                return caller  # (else perhaps a key with two dots)
        key = self.keys.check(credential)
        return None if key is None else Caller(f"key:{key}")

    def mint(
        self,
        caller: Caller,
        *,
        ttl_s: int = 0,
        subject: str = "",
        voices: Sequence[str] = (),
        session_id: str = "",
        max_streams: int = 0,
    ) -> tuple[str, int, str]:
        """A token for ``caller`` (an API key's): the token, when it expires, its principal."""
        if caller.token is not None:
            raise TokenError("a client token cannot mint tokens: call CreateClientToken with an API key")
        ttl_s = ttl_s or DEFAULT_TOKEN_TTL_S
        if not 1 <= ttl_s <= MAX_TOKEN_TTL_S:
            raise TokenError(
                f"ttl_s {ttl_s} is out of range: use 1 to {MAX_TOKEN_TTL_S}, or 0 for {DEFAULT_TOKEN_TTL_S}"
            )
        if subject and not _SUBJECT.fullmatch(subject):
            raise TokenError("subject must be 1 to 128 letters, digits, '-', '_', '.' or '@'")
        if max_streams < 0:
            raise TokenError("max_streams must not be negative")
        if len(voices) > 64 or any(not v or len(v) > 128 for v in voices) or len(session_id) > 64:
            raise TokenError("voices must be at most 64 voice ids, and session_id a session id")
        subject = subject or secrets.token_urlsafe(12)
        now = int(self._clock())
        principal = f"{caller.principal}/{subject}"
        claims = {
            "iss": _ISSUER,
            "aud": _AUDIENCE,
            "sub": principal,
            "iat": now,
            "exp": now + ttl_s,
            "jti": secrets.token_urlsafe(12),
            "scope": {"voices": list(voices), "session_id": session_id, "max_streams": max_streams},
        }
        return jwt.encode(claims, self._secret, algorithm="HS256"), now + ttl_s, principal

    def _verify(self, token: str) -> Caller | None:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                audience=_AUDIENCE,
                issuer=_ISSUER,
                options={"require": ["exp", "iat", "sub", "jti", "iss", "aud"]},
                leeway=5,
            )
            scope = claims.get("scope") or {}
            principal = str(claims["sub"])
            key, slash, subject = principal.removeprefix("key:").partition("/")
            if not principal.startswith("key:") or not slash or not _SUBJECT.fullmatch(subject):
                return None
            if not self.keys.has(key) or not isinstance(scope, dict):
                return None  # the key that minted it was revoked: so are its tokens
            return Caller(
                principal,
                TokenScope(
                    str(claims["jti"]),
                    tuple(str(v) for v in scope.get("voices") or ()),
                    str(scope.get("session_id") or ""),
                    int(scope.get("max_streams") or 0),
                ),
            )
        except (jwt.PyJWTError, TypeError, ValueError):
            return None


def _bearer(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str):
            scheme, _, credential = value.partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                return credential.strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid key or client token (UNAUTHENTICATED), except health checks
    (probes) and, when ``open_reflection``, reflection."""

    def __init__(
        self, auth: Authenticator, *, open_reflection: bool = False, refused: Callable[[str], None] | None = None
    ) -> None:
        """``refused`` is told the method of every call refused (for the metrics)."""
        self._auth = auth
        self._open_reflection = open_reflection
        self._refused = refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method  # type: ignore[attr-defined]
        handler = await continuation(details)
        if method.startswith(_HEALTH) or (self._open_reflection and method.startswith(_REFLECTION)):
            return handler
        caller = self._auth.caller(details.invocation_metadata)  # type: ignore[attr-defined]
        if caller is None:
            _log_refusal("refused %s: missing or invalid credentials", method)
            if self._refused is not None:
                self._refused(method)
            return _refusal(handler)
        return _with_caller(handler, caller) if method.startswith(_VOICE) else handler


def _with_caller(handler: grpc.RpcMethodHandler | None, caller: Caller) -> grpc.RpcMethodHandler | None:
    """``handler`` run with :data:`CALLER` set (the voice service's handlers are coroutines)."""
    if handler is None:
        return None
    if handler.stream_stream is not None:
        behavior, kind = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.unary_unary is not None:
        behavior, kind = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    else:
        return handler

    async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
        CALLER.set(caller)  # (the call's own task: its context only)
        return await behavior(request, context)

    return kind(  # type: ignore[operator]
        run, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def _refusal(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    async def refuse(_: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(refuse)
    kind = (
        grpc.stream_stream_rpc_method_handler
        if handler.request_streaming and handler.response_streaming
        else grpc.stream_unary_rpc_method_handler
        if handler.request_streaming
        else grpc.unary_stream_rpc_method_handler
        if handler.response_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    return kind(  # type: ignore[operator]
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def new_key() -> str:
    """A new random key (192 bits, URL-safe)."""
    return secrets.token_urlsafe(24)


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("USER", "client")
    print(f"{name}:{new_key()}")
