"""The bridge's settings: environment variables and flags from one model, as the README documents them."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

import ws_bridge.__main__
from tests.conftest import run_process
from ws_bridge.__main__ import bridge_options, main
from ws_bridge.config import BridgeSettings, env_name
from ws_bridge.server import BridgeOptions

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
ENV = {name: env_name(field) for name, field in BridgeSettings.model_fields.items()}

# Every variable and flag as the README has always documented them, with a value and what it becomes.
DOCUMENTED = [
    ("PARLEY_BRIDGE_HOST", "--host", "127.0.0.2", "host", "127.0.0.2"),
    ("PARLEY_BRIDGE_PORT", "--port", "9090", "port", 9090),
    ("PARLEY_GRPC_TARGET", "--grpc-target", "parley.internal:5000", "grpc_target", "parley.internal:5000"),
    (
        "PARLEY_BRIDGE_ALLOWED_ORIGINS",
        "--allowed-origins",
        "https://a.example.com",
        "allowed_origins",
        "https://a.example.com",
    ),
    ("PARLEY_BRIDGE_MAX_FRAME_BYTES", "--max-frame-bytes", "1024", "max_frame_bytes", 1024),
    ("PARLEY_BRIDGE_MAX_SOCKETS", "--max-sockets", "3", "max_sockets", 3),
    ("PARLEY_BRIDGE_PING_INTERVAL_S", "--ping-interval-s", "2.5", "ping_interval_s", 2.5),
    ("PARLEY_BRIDGE_SHUTDOWN_GRACE_S", "--shutdown-grace-s", "30", "shutdown_grace_s", 30.0),
    ("PARLEY_TWILIO_AUTH_TOKEN", "--twilio-auth-token", "abc123", "twilio_auth_token", "abc123"),
    (
        "PARLEY_TWILIO_PUBLIC_URL",
        "--twilio-public-url",
        "wss://voice.example.com/twilio",
        "twilio_public_url",
        "wss://voice.example.com/twilio",
    ),
    ("PARLEY_TWILIO_GREETING", "--twilio-greeting", "Hello there.", "twilio_greeting", "Hello there."),
    ("PARLEY_TWILIO_UNCHECKED", "--twilio-unchecked", "true", "twilio_unchecked", True),
    (
        "PARLEY_BRIDGE_API_KEY",
        "--api-key",
        "bridge-0123456789abcdefghijklm",
        "api_key",
        "bridge-0123456789abcdefghijklm",
    ),
    ("PARLEY_BRIDGE_METRICS_PORT", "--metrics-port", "9091", "metrics_port", 9091),
    ("PARLEY_BRIDGE_TLS_CERT_FILE", "--tls-cert-file", "cert.pem", "tls_cert_file", "cert.pem"),
    ("PARLEY_BRIDGE_TLS_KEY_FILE", "--tls-key-file", "key.pem", "tls_key_file", "key.pem"),
    ("PARLEY_GRPC_TLS", "--grpc-tls", "true", "grpc_tls", True),
    ("PARLEY_GRPC_CA_FILE", "--grpc-ca-file", "ca.pem", "grpc_ca_file", "ca.pem"),
    ("PARLEY_LOG_FORMAT", "--log-format", "json", "log_format", "json"),
    ("PARLEY_LOG_LEVEL", "--log-level", "DEBUG", "log_level", "DEBUG"),
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No bridge variable from outside, and :func:`main` never gets to start a bridge."""
    for env in ENV.values():
        monkeypatch.delenv(env, raising=False)

    async def must_not_run(options: BridgeOptions) -> None:
        raise AssertionError(f"the settings were accepted: {options}")

    monkeypatch.setattr(ws_bridge.__main__, "run", must_not_run)


def settings(*argv: str) -> BridgeSettings:
    return CliApp.run(BridgeSettings, cli_args=list(argv))


def test_documented_names_are_the_settings() -> None:
    assert sorted((env, flag) for env, flag, *_ in DOCUMENTED) == sorted(
        (env, f"--{name.replace('_', '-')}") for name, env in ENV.items()
    )


@pytest.mark.parametrize(("env", "flag", "raw", "name", "value"), DOCUMENTED)
def test_each_setting_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, env: str, flag: str, raw: str, name: str, value: object
) -> None:
    monkeypatch.setenv(env, raw)
    assert getattr(settings(), name) == value


@pytest.mark.parametrize(("env", "flag", "raw", "name", "value"), DOCUMENTED)
def test_each_setting_from_its_flag(env: str, flag: str, raw: str, name: str, value: object) -> None:
    assert getattr(settings(flag, raw), name) == value
    assert getattr(settings(f"{flag}={raw}"), name) == value


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_BRIDGE_PORT", "9000")
    monkeypatch.setenv("PARLEY_GRPC_TARGET", "from-env:1")
    chosen = settings("--port", "9001")
    assert (chosen.port, chosen.grpc_target) == (9001, "from-env:1")


def test_the_services_own_variables_are_not_the_bridges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_PORT", "50052")
    monkeypatch.setenv("PARLEY_HOST", "127.0.0.9")
    chosen = settings()
    assert (chosen.port, chosen.host) == (8080, "127.0.0.1")


def test_defaults_and_the_options_they_make() -> None:
    options = bridge_options(settings())
    assert options == BridgeOptions()  # the dataclass's defaults are the settings' own
    assert (options.port, options.grpc_target, options.max_frame_bytes, options.ping_timeout_s) == (
        8080,
        "127.0.0.1:50051",
        131072,
        20.0,
    )


def test_a_variable_set_to_nothing_is_a_setting_left_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ENV.values():
        monkeypatch.setenv(variable, "")
    assert BridgeSettings() == BridgeSettings.model_construct()


def test_origins_from_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_BRIDGE_ALLOWED_ORIGINS", " https://a.example.com, http://127.0.0.1:9000 ,,")
    assert bridge_options(settings()).allowed_origins == ("https://a.example.com", "http://127.0.0.1:9000")
    assert settings("--allowed-origins", "").origins == ()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "--port / PARLEY_BRIDGE_PORT: Input should be less than or equal to 65535"),
        (["--port", "http"], "--port / PARLEY_BRIDGE_PORT: Input should be a valid integer"),
        (
            ["--max-frame-bytes", "0"],
            "--max-frame-bytes / PARLEY_BRIDGE_MAX_FRAME_BYTES: Input should be greater",
        ),
        (["--max-sockets", "-1"], "--max-sockets / PARLEY_BRIDGE_MAX_SOCKETS: Input should be greater than 0"),
        (["--ping-interval-s", "0"], "--ping-interval-s / PARLEY_BRIDGE_PING_INTERVAL_S: Input should be greater"),
        (["--log-level", "LOUD"], "--log-level / PARLEY_LOG_LEVEL: Input should be 'DEBUG', 'INFO'"),
        (["--grpc-target", ""], "--grpc-target / PARLEY_GRPC_TARGET: String should have at least 1 character"),
        (["--allowed-origins", "https://a.example.com/"], "'https://a.example.com/' is not an origin"),
        (["--allowed-origins", "a.example.com"], "'a.example.com' is not an origin"),
        (["--allowed-origins", "https://A.example.com"], "in lower case"),
        (  # (a QA pass: a bind error on the port, which did not name the metrics)
            ["--port", "18093", "--metrics-port", "18093"],
            "PARLEY_BRIDGE_METRICS_PORT (18093) must not be the bridge's own port (PARLEY_BRIDGE_PORT, 18093)",
        ),
        (["--ping-interval-s", "inf"], "--ping-interval-s / PARLEY_BRIDGE_PING_INTERVAL_S: Input should be a finite"),
        (
            ["--twilio-public-url", "https://voice.example.com/twilio"],
            "--twilio-public-url / PARLEY_TWILIO_PUBLIC_URL: 'https://voice.example.com/twilio' is not a WebSocket URL",
        ),
    ],
)
def test_invalid_settings_exit_2_naming_flag_and_variable(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m ws_bridge: invalid setting:\n")
    assert message in error


def test_an_invalid_setting_is_one_json_line_when_the_log_is_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    monkeypatch.setenv("PARLEY_LOG_FORMAT", "json")
    assert main(["--port", "70000"]) == 2
    line = capsys.readouterr().err
    assert line.count("\n") == 1
    entry = json.loads(line)
    assert (entry["level"], entry["logger"]) == ("ERROR", "ws_bridge")
    assert "--port / PARLEY_BRIDGE_PORT: Input should be less than or equal to 65535" in entry["message"]


def test_an_invalid_variable_is_named_too(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PARLEY_BRIDGE_MAX_SOCKETS", "many")
    assert main([]) == 2
    assert "--max-sockets / PARLEY_BRIDGE_MAX_SOCKETS: Input should be a valid integer" in capsys.readouterr().err
    with pytest.raises(ValidationError):
        settings()


async def test_the_process_exits_2_on_an_invalid_setting() -> None:
    code, _, stderr = await run_process(sys.executable, "-m", "ws_bridge", "--port", "70000")
    assert code == 2, stderr
    assert "invalid setting" in stderr and "PARLEY_BRIDGE_PORT" in stderr and "Traceback" not in stderr


async def test_an_unknown_flag_exits_2() -> None:
    code, _, stderr = await run_process(sys.executable, "-m", "ws_bridge", "--no-such-flag", "1")
    assert code == 2 and "unrecognized arguments: --no-such-flag" in stderr


async def test_help_names_every_flag_its_variable_and_default() -> None:
    code, stdout, stderr = await run_process(sys.executable, "-m", "ws_bridge", "--help")
    assert code == 0, stderr
    help_text = " ".join(stdout.split())  # argparse wraps lines anywhere
    for name, env in ENV.items():
        assert f"--{name.replace('_', '-')}" in help_text
        assert f"[env {env}]" in help_text
    assert "(default: 8080)" in help_text and "(default: 127.0.0.1:50051)" in help_text


def _readme_default(default: object) -> str:
    if default == "" or default is None:
        return "none"
    if isinstance(default, bool):
        return str(default).lower()
    return f"{default:g}" if isinstance(default, float | int) else str(default)


@pytest.mark.parametrize("name", sorted(BridgeSettings.model_fields))
def test_the_readme_documents_each_setting_with_its_default(name: str) -> None:
    flag = f"--{name.replace('_', '-')}"
    row = re.search(rf"^\| `{ENV[name]}` \| `{flag}` \| ([^|]+) \|", README, re.MULTILINE)
    assert row is not None, f"README has no row for {ENV[name]} / {flag}"
    assert row.group(1).strip().strip("`") == _readme_default(BridgeSettings.model_fields[name].default)


def test_a_variable_named_as_the_bridges_that_it_does_not_read_is_said() -> None:
    from ws_bridge.config import unknown_variables

    environ = {
        "PARLEY_BRIDGE_PROT": "8080",
        "parley_bridge_port": "8080",  # (the bridge reads its variables by their exact names)
        "PARLEY_GRPC_TARGET": "localhost:50051",
        "PARLEY_LOG_LEVL": "DEBUG",
        "PARLEY_WORKRES": "2",  # the service's to check
        "PARLEY_TWILIO_AUTH_TOKEN": "x",
    }
    assert unknown_variables(environ) == [
        "PARLEY_BRIDGE_PROT is not a variable the bridge reads; it is ignored (did you mean PARLEY_BRIDGE_PORT?)",
        "PARLEY_LOG_LEVL is not a variable the bridge reads; it is ignored (did you mean PARLEY_LOG_LEVEL?)",
        "parley_bridge_port is not a variable the bridge reads; it is ignored (did you mean PARLEY_BRIDGE_PORT?)",
    ]


def test_a_choice_is_taken_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    # An SRE's pass: PARLEY_LOG_LEVEL=debug stopped the service with exit 2 (and the bridge shares it).
    monkeypatch.setenv("PARLEY_LOG_LEVEL", "debug")
    monkeypatch.setenv("PARLEY_LOG_FORMAT", " JSON")
    chosen = settings()
    assert (chosen.log_level, chosen.log_format) == ("DEBUG", "json")
    monkeypatch.setenv("PARLEY_LOG_LEVEL", "verbose")
    with pytest.raises(ValidationError):
        settings()
