"""Settings. Each is an environment variable ``PARLEY_<NAME>`` and a flag ``--<name>``.

Flags win over the environment, which wins over the defaults. ``python -m service --help`` lists them.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.core.history import HistoryLimits
from service.core.outbox import OutboxLimits
from service.core.settings import SessionDefaults
from service.core.store import DEFAULT_SESSION_TTL_S
from service.core.turn import TurnOptions
from service.engines.openai_voices import OPENAI_VOICES
from service.servicer import StreamLimits
from service.setting_errors import BRIDGE_PREFIXES, ChoicesInAnyCase, without_credentials
from service.setting_errors import unknown_variables as describe_unknown
from service.stores.memory import DEFAULT_MAX_SESSIONS

_SESSION = SessionDefaults()
_TURN = TurnOptions()
_OUTBOX = OutboxLimits()
_HISTORY = HistoryLimits()
_STREAMS = StreamLimits()

__all__ = ["Settings", "setting_names", "unknown_variables"]


class Settings(ChoicesInAnyCase, BaseSettings):
    """Parley's gRPC voice-reply service. Every flag is also an environment variable PARLEY_<NAME>
    (for example --port / PARLEY_PORT); flags win."""

    model_config = SettingsConfigDict(
        env_prefix="PARLEY_",
        env_ignore_empty=True,  # PARLEY_X= (templates often leave one so) is PARLEY_X unset: the default
        cli_kebab_case=True,
        cli_prog_name="python -m service",
        cli_implicit_flags=True,
        frozen=True,
        # Errors do not echo what was given: a URL may hold a password (each message says what is wrong).
        hide_input_in_errors=True,
        allow_inf_nan=False,  # (an infinite grace or timeout is a typo, not a setting: 0 says never)
    )

    host: str = Field(
        "127.0.0.1",
        description="Address to listen on. Without API keys, only a loopback address, unless "
        "allow_unauthenticated is set.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="A file of API keys, one per line (name:key or key; # comments), read again when it "
        "changes. With keys, every call but health checks needs authorization: Bearer <key>.",
    )
    api_keys: str = Field("", description="API keys as name:key entries separated by commas (besides the file's).")
    allow_unauthenticated: bool = Field(
        False,
        description="Serve on a non-loopback address without API keys: anyone who reaches the port may use "
        "the service (and the engines' bills). Off: such a start is refused.",
    )
    open_reflection: bool = Field(False, description="With API keys: let gRPC reflection answer without a key.")
    token_secret: str = Field(
        "",
        description="Signs client tokens (CreateClientToken), at least 32 characters, the same on every replica. "
        "Empty: no client tokens.",
    )
    quota_streams: int = Field(
        0, ge=0, description="Streams open at once per API key (or client token subject). 0: none."
    )
    quota_turns_per_minute: int = Field(0, ge=0, description="Turns begun per minute per key or subject. 0: none.")
    quota_chars_per_minute: int = Field(
        0, ge=0, description="Characters synthesized per minute per key or subject. 0: none."
    )
    tls_cert_file: Path | None = Field(
        None, description="TLS on the gRPC port: the certificate chain (PEM); with tls_key_file. Reloaded on change."
    )
    tls_key_file: Path | None = Field(None, description="TLS: the certificate's private key (PEM).")
    tls_client_ca_file: Path | None = Field(
        None, description="Mutual TLS: clients must present a certificate signed by these CAs (PEM)."
    )
    port: int = Field(50051, ge=0, le=65535, description="gRPC port.")
    workers: int | Literal["auto"] = Field(
        1,
        description=(
            "Service processes sharing the port (auto: one per core this process may use, within a container's "
            "CPU limit); several need the redis session store."
        ),
    )
    worker_timeout_s: float = Field(
        10.0,
        ge=0,
        description=(
            "With several workers: a worker whose event loop has not answered the supervisor for this long (hung, "
            "or stopped) is killed and restarted. 0: never."
        ),
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description=(
            "Serve Prometheus metrics on this port (same address as the service; with workers, every worker's, "
            "labelled worker). Off: none."
        ),
    )
    llm: Literal["local", "openai", "scripted"] = Field(
        "local", description="LLM engine: local (embedded), openai, or scripted (fixed latency, for benchmarks)."
    )
    tts: Literal["piper", "openai", "scripted"] = Field(
        "piper", description="TTS engine: piper (embedded), openai, or scripted (fixed latency, for benchmarks)."
    )
    stt: Literal["whisper", "openai", "none"] = Field(
        "whisper",
        description="Speech-to-text engine for voice input: whisper (embedded, faster-whisper), openai, or none "
        "(text only).",
    )
    scripted_profile: Literal["cloud", "quick"] = Field(
        "cloud", description="Latency profile of the scripted engines (see service/engines/scripted.py)."
    )
    llm_model_path: Path | None = Field(
        None, description="GGUF model for the local LLM. Default: Gemma 3 270M from its PyPI package."
    )
    llm_context_size: int = Field(2048, ge=256, description="Context window of the local LLM, in tokens.")
    llm_threads: int | None = Field(None, ge=1, description="CPU threads for the local LLM. Default: all cores.")
    llm_temperature: float = Field(_SESSION.temperature, ge=0, le=2, description="Default sampling temperature.")
    llm_max_tokens: int = Field(
        _SESSION.max_tokens, ge=1, description="Longest reply in tokens (a client may ask for fewer)."
    )
    system_prompt: str = Field(_SESSION.system_prompt, description="System prompt when a client sends none.")
    piper_voice_path: Path | None = Field(
        None,
        description="Default Piper voice (.onnx, with its .onnx.json beside it). Default: en_US-joe-medium (PyPI).",
    )
    piper_voice_dir: Path | None = Field(None, description="Folder of further Piper voices (*.onnx) to offer.")
    tts_workers: int = Field(2, ge=1, description="Syntheses that may run at once.")
    tts_threads: int = Field(0, ge=0, description="CPU threads per Piper synthesis. Default (0): one per core.")
    share_cores: bool = Field(
        True,
        description="With the embedded LLM and Piper: the LLM pauses while a reply's first segment is synthesized.",
    )
    stt_model_path: Path | None = Field(
        None, description="faster-whisper model folder for the whisper STT engine. Default: Whisper base (PyPI)."
    )
    stt_threads: int | None = Field(None, ge=1, description="CPU threads for Whisper. Default: all cores.")
    stt_language: str = Field(
        "", description="Language the user speaks, as a code such as en (a client may name its own). Default: detect."
    )
    lookahead_segments: int = Field(
        _TURN.lookahead, ge=0, description="Segments synthesized ahead of the one whose audio is being sent."
    )
    opus_bitrate: int = Field(
        _TURN.codecs.opus_bitrate_bps,
        ge=6000,
        le=256000,
        description="OGG_OPUS audio: the default bitrate in bit/s (a session may choose its own).",
    )
    opus_application: Literal["voip", "audio", "lowdelay"] = Field(
        "voip", description="OGG_OPUS audio: libopus's tuning (voip: speech)."
    )
    mp3_bitrate: int = Field(
        _TURN.codecs.mp3_bitrate_bps,
        ge=8000,
        le=320000,
        description="MP3 audio: the default bitrate in bit/s (a session may choose its own).",
    )
    audio_chunk_ms: int = Field(
        _OUTBOX.max_message_ms,
        ge=10,
        le=2000,
        description=(
            "Longest audio message, in milliseconds (a turn's first message leaves at once, and the next "
            "ones grow with what the client holds up to this)."
        ),
    )
    caption_gather_ms: int = Field(
        _OUTBOX.caption_gather_ms,
        ge=0,
        le=1000,
        description=(
            "How long a turn's caption text gathers into one text_delta message, in milliseconds (a "
            "turn's first caption leaves at once, and its audio never waits for text; 0: text leaves as it "
            "comes, though deltas that wait together while the stream's writer is busy leave as one)."
        ),
    )
    max_text_chars: int = Field(
        _SESSION.max_text_chars, ge=1, description="Longest user_text or speak turn, in characters."
    )
    idle_timeout_s: float = Field(
        _SESSION.idle_timeout_s, gt=0, description="Close a stream after this long with no message and no turn."
    )
    max_streams: int = Field(
        _STREAMS.max_streams, ge=1, description="Concurrent Converse streams; more get RESOURCE_EXHAUSTED."
    )
    send_timeout_s: float = Field(
        _STREAMS.send_timeout_s,
        gt=0,
        description="Close a stream whose client reads nothing for this long while replies wait.",
    )
    keepalive_s: float = Field(
        30.0,
        ge=0,
        description="Ping each client connection this often (0, or at least 1); one that does not answer within "
        "20 s is closed and its streams end, as a client gone without a word would otherwise hold them until the "
        "idle timeout. 0: gRPC's default (every 2 hours).",
    )
    shutdown_grace_s: float = Field(10.0, ge=0, description="On SIGTERM/SIGINT, time given to streams in flight.")
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop",
        description="The event loop: uvloop (libuv's; less CPU per message, timers to the millisecond) or asyncio "
        "(Python's own, for debugging).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="text (for a terminal) or json (one object per line, with session and turn)."
    )
    session_store: Literal["memory", "redis"] = Field(
        "memory", description="Where sessions live: memory (this process) or redis (shared by replicas)."
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for the redis session store.")
    redis_prefix: str = Field("parley", description="Namespace of Parley's Redis keys.")
    session_ttl_s: float = Field(
        DEFAULT_SESSION_TTL_S,
        gt=0,
        description="Forget a session after this long with no stream (at least idle_timeout_s).",
    )
    memory_max_sessions: int = Field(
        DEFAULT_MAX_SESSIONS,
        ge=1,
        description="Most sessions the memory store keeps; when full, the least recently used idle one is "
        "forgotten, and while every one is held by a stream new sessions get RESOURCE_EXHAUSTED.",
    )
    history_max_turns: int = Field(_HISTORY.max_turns, ge=1, description="Turns a session keeps; the oldest go first.")
    history_max_chars: int = Field(_HISTORY.max_chars, ge=100, description="Characters of history a session keeps.")
    openai_base_url: str | None = Field(
        None,
        description="OpenAI-compatible server, e.g. http://localhost:11434/v1. Default: OPENAI_BASE_URL, else OpenAI.",
    )
    openai_api_key_file: Path | None = Field(
        None, description="File holding the API key (instead of OPENAI_API_KEY / PARLEY_OPENAI_API_KEY)."
    )
    openai_organization: str | None = Field(None, description="OpenAI organization id. Default: OPENAI_ORG_ID.")
    openai_project: str | None = Field(None, description="OpenAI project id. Default: OPENAI_PROJECT_ID.")
    openai_extra_headers: str = Field("", description='Extra HTTP headers as a JSON object, e.g. {"X-Team": "voice"}.')
    openai_timeout_s: float = Field(30.0, gt=0, description="Request timeout (connect, response, each read).")
    openai_stall_timeout_s: float = Field(
        15.0, gt=0, description="Cancel a streamed response that sends nothing for this long."
    )
    openai_max_attempts: int = Field(3, ge=1, description="Tries per request (429, 5xx, connection errors).")
    openai_model: str = Field("gpt-4o-mini", description="Chat model of the openai LLM engine.")
    openai_stream_usage: bool = Field(
        True, description="Ask for token usage in the stream (turn off for servers that reject stream_options)."
    )
    openai_tts_model: str = Field("gpt-4o-mini-tts", description="Speech model of the openai TTS engine.")
    openai_tts_voice: str = Field("alloy", description="Default voice of the openai TTS engine.")
    openai_tts_voices: str = Field(
        ",".join(OPENAI_VOICES),
        description="Comma-separated voices ListVoices offers with the openai TTS engine.",
    )
    openai_tts_speed: float = Field(1.0, ge=0.25, le=4.0, description="Speaking speed of the openai TTS engine.")
    openai_tts_instructions: str = Field(
        "", description="How the openai TTS engine should speak (models that support instructions)."
    )
    openai_stt_model: str = Field(
        "gpt-4o-mini-transcribe",
        description="Transcription model of the openai STT engine (compatible servers mostly offer whisper-1).",
    )

    @field_validator("openai_base_url")
    @classmethod
    def _base_url_is_a_url(cls, value: str | None) -> str | None:
        if value:  # empty: not set
            if problem := _http_url_problem(value):
                raise ValueError(f"PARLEY_OPENAI_BASE_URL (--openai-base-url) {problem}")
        return value

    @field_validator("host")
    @classmethod
    def _host_bare(cls, value: str) -> str:
        """An IPv6 address with or without its brackets (``::1``, ``[::1]``): kept bare, bracketed
        where it is joined to a port (:func:`address`)."""
        value = value.strip()
        bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
        if "[" in bare or "]" in bare or (":" in bare and not _is_ipv6(bare)):  # (a name has no colon)
            raise ValueError(
                f"PARLEY_HOST (--host) is {value!r}: give an address or a name without a port (the port is "
                "PARLEY_PORT), an IPv6 address with or without its brackets (::1 or [::1])"
            )
        return bare

    @field_validator("redis_url")
    @classmethod
    def _redis_url_is_a_url(cls, value: str) -> str:
        if problem := _redis_url_problem(value):
            raise ValueError(f"PARLEY_REDIS_URL (--redis-url) {problem}")
        return value

    @model_validator(mode="after")
    def _openai_env_base_url_is_a_url(self) -> Settings:
        """OPENAI_BASE_URL stands in for openai_base_url when an openai engine runs without it."""
        env = os.environ.get("OPENAI_BASE_URL")
        if "openai" in (self.llm, self.tts) and not self.openai_base_url and env:
            if problem := _http_url_problem(env):
                raise ValueError(f"OPENAI_BASE_URL (used as PARLEY_OPENAI_BASE_URL is not set) {problem}")
        return self

    @model_validator(mode="after")
    def _workers_share_sessions(self) -> Settings:
        if self.worker_count < 1:
            raise ValueError("PARLEY_WORKERS (--workers) must be at least 1, or auto")
        if self.workers != "auto" and self.workers > 1:
            from service.workers import MAX_WORKERS_PER_CORE, core_count

            if self.workers > (most := MAX_WORKERS_PER_CORE * core_count()):
                raise ValueError(
                    f"PARLEY_WORKERS (--workers) is {self.workers}, more than {most} ({MAX_WORKERS_PER_CORE} for "
                    f"each of the {core_count()} cores this process may use): more processes than cores serve no "
                    "more streams, and each loads its own engines"
                )
        if self.worker_count > 1 and self.session_store != "redis":
            raise ValueError(
                "several workers need a session store they share: set PARLEY_SESSION_STORE=redis (a session "
                "resumed on another connection may reach another worker, which the memory store cannot serve)"
            )
        from service.workers import HEARTBEAT_S, MIN_WORKER_TIMEOUT_S

        if 0 < self.worker_timeout_s < MIN_WORKER_TIMEOUT_S:
            raise ValueError(
                "PARLEY_WORKER_TIMEOUT_S (--worker-timeout-s) must be 0 (never) or at least "
                f"{MIN_WORKER_TIMEOUT_S:g} s: a worker tells the supervisor it is alive every {HEARTBEAT_S:g} s, "
                "so a shorter timeout would kill healthy workers again and again"
            )
        if 0 < self.keepalive_s < 1:
            raise ValueError(
                "PARLEY_KEEPALIVE_S (--keepalive-s) must be 0 (gRPC's default) or at least 1 s: a ping every few "
                "milliseconds is a flood, and gRPC fails the calls of a connection it cannot keep up with"
            )
        if self.worker_count > 1 and self.port == 0:
            raise ValueError("several workers share one port: set PARLEY_PORT (not 0)")
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(f"PARLEY_METRICS_PORT ({self.metrics_port}) must not be the gRPC port (PARLEY_PORT)")
        return self

    @property
    def worker_count(self) -> int:
        if self.workers != "auto":
            return self.workers
        from service.workers import core_count

        return core_count()

    @field_validator("api_keys")
    @classmethod
    def _api_keys_parse(cls, value: str) -> str:
        from service.auth import parse_keys

        parse_keys(value, "PARLEY_API_KEYS")  # (a ValueError saying which entry is wrong, never the key)
        return value

    @model_validator(mode="after")
    def _token_secret_is_usable(self) -> Settings:
        if self.token_secret and len(self.token_secret) < 32:
            raise ValueError("token_secret (PARLEY_TOKEN_SECRET) must have at least 32 characters")
        if self.token_secret and self.api_keys_file is None and not self.api_keys:
            raise ValueError(
                "token_secret needs API keys to mint tokens with: set PARLEY_API_KEYS_FILE or PARLEY_API_KEYS"
            )
        return self

    @model_validator(mode="after")
    def _tls_files_together(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both tls_cert_file and tls_key_file (PARLEY_TLS_CERT_FILE, PARLEY_TLS_KEY_FILE)")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs TLS: set PARLEY_TLS_CERT_FILE and PARLEY_TLS_KEY_FILE too")
        return self

    @model_validator(mode="after")
    def _not_open_by_accident(self) -> Settings:
        if self.api_keys_file is None and not self.api_keys and not self.allow_unauthenticated:
            if not _is_loopback(self.host):
                raise ValueError(
                    f"host {self.host} without API keys would let anyone who reaches it use the service: set "
                    "PARLEY_API_KEYS_FILE (or PARLEY_API_KEYS; python -m service.auth prints a key), listen on "
                    "127.0.0.1, or set PARLEY_ALLOW_UNAUTHENTICATED=true to run it open on purpose"
                )
        return self

    @model_validator(mode="after")
    def _reply_fits_the_context(self) -> Settings:
        if self.llm_max_tokens >= self.llm_context_size:
            raise ValueError(
                f"PARLEY_LLM_MAX_TOKENS ({self.llm_max_tokens}) must be smaller than PARLEY_LLM_CONTEXT_SIZE "
                f"({self.llm_context_size}), or no prompt fits"
            )
        if self.session_ttl_s < self.idle_timeout_s:
            raise ValueError(
                f"PARLEY_SESSION_TTL_S ({self.session_ttl_s:g}) must be at least PARLEY_IDLE_TIMEOUT_S "
                f"({self.idle_timeout_s:g}), or a session could expire under a stream that is still open"
            )
        if self.openai_extra_headers:
            try:
                headers = json.loads(self.openai_extra_headers)
            except ValueError as error:
                raise ValueError(f"PARLEY_OPENAI_EXTRA_HEADERS is not JSON: {error}") from error
            if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
                raise ValueError(
                    'PARLEY_OPENAI_EXTRA_HEADERS must be a JSON object of strings, like {"X-Team": "voice"}'
                )
        return self

    def extra_headers(self) -> dict[str, str]:
        """The parsed ``openai_extra_headers``."""
        return dict(json.loads(self.openai_extra_headers)) if self.openai_extra_headers else {}


def _http_url_problem(url: str) -> str | None:
    """What is wrong with an OpenAI-compatible server's base URL, or None."""
    example = "write the server's base URL with its scheme, e.g. http://localhost:11434/v1"
    shown = without_credentials(url)
    if any(c.isspace() for c in url):
        return f"is {shown!r}, which holds a space: {example}"
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        return f"is {shown!r}, not an http:// or https:// URL: {example}"
    return _host_and_port_problem(url, example)


def _redis_url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL, or None (the schemes and parts redis-py reads)."""
    example = "e.g. redis://127.0.0.1:6379/0 (rediss:// for TLS, or unix:// and the socket's path)"
    shown = without_credentials(url)
    if any(c.isspace() for c in url):
        return f"is {shown!r}, which holds a space: {example}"
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "unix":
        return None if parts.path else f"is {shown!r}, which names no socket: write unix:// and the socket's path"
    if scheme not in ("redis", "rediss"):
        return f"is {shown!r}, not a redis://, rediss:// or unix:// URL: {example}"
    database = parts.path.strip("/")
    if database and not database.isdigit():
        return f"is {shown!r}: the database after the host must be a number ({database!r} is not): {example}"
    return _host_and_port_problem(url, example)


def _host_and_port_problem(url: str, example: str) -> str | None:
    parts, shown = urlsplit(url), without_credentials(url)
    if not parts.hostname:
        return f"is {shown!r}, which names no host: {example}"
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        return f"is {shown!r}, whose port is not a number up to 65535: {example}"
    return None


def address(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets (``[::1]:50051``), as gRPC and URLs take it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)  # (bare: see _host_bare)
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None  # (::ffff:127.0.0.1)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def setting_names(name: str) -> str | None:
    """A setting's flag and variable (for :func:`service.setting_errors.describe_errors`), or None."""
    return f"--{name.replace('_', '-')} / PARLEY_{name.upper()}" if name in Settings.model_fields else None


OTHER_VARIABLES = frozenset(
    {
        "PARLEY_OPENAI_API_KEY",  # the OpenAI engines' key (never a flag)
        "PARLEY_SERVER",  # the CLI's service address
        "PARLEY_TOKEN",  # the CLI's API key
        "PARLEY_WORKER_INDEX",  # what a supervisor tells its workers (service.workers)
        "PARLEY_SUPERVISOR_PID",
        "PARLEY_READY_FD",
        "PARLEY_TEST_EVENT_LOOP",  # the test suite's
    }
)
"""The ``PARLEY_`` variables read elsewhere than in :class:`Settings`."""


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A line for each ``PARLEY_`` variable that neither the service nor the CLI reads, leaving out the
    bridge's (``BRIDGE_PREFIXES``), which the bridge checks."""
    known = {f"PARLEY_{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES
    return describe_unknown(environ, known, case_sensitive=False, others=BRIDGE_PREFIXES)
