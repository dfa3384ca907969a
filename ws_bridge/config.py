"""The bridge's settings. Each is a flag ``--<name>`` and an environment variable, named in ``--help``.

Most variables are ``PARLEY_BRIDGE_<NAME>``; ``PARLEY_GRPC_TARGET`` and ``PARLEY_LOG_LEVEL`` have no
``BRIDGE_`` (the log level is shared with the service). Flags win over the environment, which wins
over the defaults; the defaults live here and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from service.setting_errors import BRIDGE_PREFIXES, ChoicesInAnyCase
from service.setting_errors import describe_errors as describe_setting_errors
from service.setting_errors import unknown_variables as describe_unknown

__all__ = ["BridgeSettings", "default", "describe_errors", "env_name", "unknown_variables"]


def _setting(default: Any, env: str, description: str, **constraints: Any) -> Any:
    """A field whose environment variable is ``env``; the help names it."""
    return Field(default, description=f"{description} [env {env}]", json_schema_extra={"env": env}, **constraints)


def env_name(field: FieldInfo) -> str:
    """The environment variable of a setting."""
    extra = field.json_schema_extra
    assert isinstance(extra, dict) and isinstance(extra.get("env"), str)
    return str(extra["env"])


class BridgeSettings(ChoicesInAnyCase, BaseSettings):
    """Parley's WebSocket bridge and its demo page. Every flag is also an environment variable, named in
    brackets (for example --port / PARLEY_BRIDGE_PORT); flags win."""

    model_config = SettingsConfigDict(
        cli_kebab_case=True,
        cli_prog_name="python -m ws_bridge",
        frozen=True,
        allow_inf_nan=False,  # (an infinite interval is a typo, not a setting)
    )

    host: str = _setting(
        "127.0.0.1",
        "PARLEY_BRIDGE_HOST",
        "Address to listen on (0.0.0.0: every interface, for other machines and phones).",
        min_length=1,
    )
    port: int = _setting(
        8080, "PARLEY_BRIDGE_PORT", "Port of the page, /ws and /twilio (0: any free port).", ge=0, le=65535
    )
    grpc_target: str = _setting("127.0.0.1:50051", "PARLEY_GRPC_TARGET", "The Parley service.", min_length=1)
    allowed_origins: str = _setting(
        "",
        "PARLEY_BRIDGE_ALLOWED_ORIGINS",
        "Comma-separated origins (scheme://host[:port]) allowed besides the bridge's own and localhost.",
    )
    max_frame_bytes: int = _setting(
        128 * 1024,
        "PARLEY_BRIDGE_MAX_FRAME_BYTES",
        "Largest client frame (a second of 48 kHz voice is 96 KB); larger ones close with 1009.",
        gt=0,
    )
    max_sockets: int = _setting(200, "PARLEY_BRIDGE_MAX_SOCKETS", "Concurrent sockets; more get HTTP 503.", gt=0)
    ping_interval_s: float = _setting(
        20.0, "PARLEY_BRIDGE_PING_INTERVAL_S", "Keepalive ping interval, and how long a pong may take.", gt=0
    )
    shutdown_grace_s: float = _setting(
        10.0,
        "PARLEY_BRIDGE_SHUTDOWN_GRACE_S",
        "On SIGTERM, how long phone calls in progress may go on (no new socket is taken; pages are closed at "
        "once, and resume elsewhere); a second signal ends them at once. 0: close everything at once.",
        ge=0,
    )
    twilio_auth_token: str = _setting(
        "",
        "PARLEY_TWILIO_AUTH_TOKEN",
        "Twilio's auth token: /twilio then refuses upgrade requests without a valid X-Twilio-Signature. "
        "Empty: /twilio refuses every call, unless twilio_unchecked is set.",
    )
    twilio_unchecked: bool = _setting(
        False,
        "PARLEY_TWILIO_UNCHECKED",
        "Without an auth token, take calls on /twilio unchecked, from anyone who reaches the bridge (a tunnel "
        "or a proxy too), with the bridge's API key: for development only.",
    )
    twilio_public_url: str = _setting(
        "",
        "PARLEY_TWILIO_PUBLIC_URL",
        "The stream URL Twilio is given (wss://example.com/twilio), which it signs. Empty: wss:// and the "
        "request's Host.",
    )
    twilio_greeting: str = _setting(
        "", "PARLEY_TWILIO_GREETING", "Said when a call starts (a call's greeting parameter overrides it)."
    )
    metrics_port: int | None = _setting(
        None,
        "PARLEY_BRIDGE_METRICS_PORT",
        "Serve the bridge's Prometheus metrics on this port. Off when unset.",
        ge=0,
        le=65535,
    )
    api_key: str = _setting(
        "",
        "PARLEY_BRIDGE_API_KEY",
        "An API key of the service, for phone calls on /twilio (Twilio's own calls carry none).",
    )
    tls_cert_file: str = _setting(
        "",
        "PARLEY_BRIDGE_TLS_CERT_FILE",
        "Serve https and wss with this certificate chain (PEM), read again when it changes; with tls-key-file.",
    )
    tls_key_file: str = _setting("", "PARLEY_BRIDGE_TLS_KEY_FILE", "The bridge certificate's private key (PEM).")
    grpc_tls: bool = _setting(False, "PARLEY_GRPC_TLS", "Reach the service with TLS (trusting the system's CAs).")
    grpc_ca_file: str = _setting(
        "", "PARLEY_GRPC_CA_FILE", "Reach the service with TLS, trusting the CA certificates in this PEM file."
    )
    log_format: Literal["text", "json"] = _setting(
        "text", "PARLEY_LOG_FORMAT", "text, or json: one object per line (shared with the service)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _setting(
        "INFO", "PARLEY_LOG_LEVEL", "Log level (shared with the service)."
    )

    @model_validator(mode="after")
    def _metrics_on_a_port_of_their_own(self) -> BridgeSettings:
        if self.metrics_port and self.metrics_port == self.port:  # (found in a QA pass: a bind error said it)
            raise ValueError(
                f"PARLEY_BRIDGE_METRICS_PORT ({self.metrics_port}) must not be the bridge's own port "
                f"(PARLEY_BRIDGE_PORT, {self.port})"
            )
        return self

    @field_validator("allowed_origins")
    @classmethod
    def _origins_are_origins(cls, value: str) -> str:
        for origin in _split(value):
            if not _is_origin(origin):
                raise ValueError(
                    f"{origin!r} is not an origin as a browser sends it: write scheme://host[:port] in lower case, "
                    "like https://app.example.com (no path, no trailing slash)"
                )
        return value

    @field_validator("twilio_public_url")
    @classmethod
    def _a_websocket_url(cls, value: str) -> str:
        if value and (urlsplit(value).scheme not in ("wss", "ws") or not urlsplit(value).hostname):
            raise ValueError(f"{value!r} is not a WebSocket URL: write it as Twilio is given it, wss://host/twilio")
        return value

    @property
    def origins(self) -> tuple[str, ...]:
        """The parsed ``allowed_origins``."""
        return _split(self.allowed_origins)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _Environment(settings_cls)


def _split(origins: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in origins.split(",") if o.strip())


def _is_origin(origin: str) -> bool:
    parts = urlsplit(origin)
    try:
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and "@" not in parts.netloc
        and origin == f"{parts.scheme}://{parts.netloc.lower()}"
    )


class _Environment(PydanticBaseSettingsSource):
    """Each setting from its own variable, by its exact name; a variable set to nothing (templates
    often leave one so) is one left unset: the setting keeps its default."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return os.environ.get(env_name(field)), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, _, _ = self.get_field_value(field, name)
            if value:
                values[name] = value
        return values


def default(name: str) -> Any:
    """A setting's default, for :class:`ws_bridge.server.BridgeOptions` (the defaults live here alone)."""
    return BridgeSettings.model_fields[name].default


def describe_errors(error: ValidationError) -> str:
    """One line per invalid setting, naming its flag and its variable."""

    def where(name: str) -> str | None:
        field = BridgeSettings.model_fields.get(name)
        return f"--{name.replace('_', '-')} / {env_name(field)}" if field is not None else None

    return describe_setting_errors(error, where)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A line for each variable named as the bridge's are (``BRIDGE_PREFIXES``, and ``PARLEY_LOG_``,
    shared with the service) that the bridge does not read (it reads its own by their exact names).
    The service checks the rest."""
    known = {env_name(field) for field in BridgeSettings.model_fields.values()}
    return describe_unknown(
        environ, known, case_sensitive=True, mine=(*BRIDGE_PREFIXES, "PARLEY_LOG_"), reader="the bridge"
    )
