"""A malformed URL setting stops the service at start-up with a message naming the setting, instead of
failing every turn (the OpenAI base URL) or ending in a traceback (the Redis URL)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings
from tests.conftest import run_process


async def run_service(*args: str, **env: str) -> tuple[int, str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PARLEY_", "OPENAI_"))}
    return await run_process(
        sys.executable,
        "-m",
        "service",
        "--llm",
        "scripted",
        "--tts",
        "scripted",
        "--port",
        "0",
        *args,
        env={**environ, **env},
        timeout_s=30,
    )


async def test_a_base_url_that_is_no_url_stops_the_service_at_once() -> None:
    code, _, stderr = await run_service("--openai-base-url", "not-a-url")
    assert code == 2, stderr
    assert (
        "PARLEY_OPENAI_BASE_URL (--openai-base-url) is 'not-a-url', not an http:// or https:// URL: "
        "write the server's base URL with its scheme, e.g. http://localhost:11434/v1"
    ) in stderr
    assert "Traceback" not in stderr and "listening" not in stderr


async def test_a_redis_url_that_is_no_url_stops_the_service_at_once() -> None:
    code, _, stderr = await run_service(PARLEY_SESSION_STORE="redis", PARLEY_REDIS_URL="localhost:6379")
    assert code == 2, stderr
    assert "PARLEY_REDIS_URL (--redis-url) is 'localhost:6379', not a redis://, rediss:// or unix:// URL" in stderr
    assert "Traceback" not in stderr and "listening" not in stderr


async def test_openai_base_url_from_the_openai_variable_is_checked_too() -> None:
    code, _, stderr = await run_service("--llm", "openai", OPENAI_BASE_URL="localhost:11434/v1")
    assert code == 2, stderr
    assert "OPENAI_BASE_URL (used as PARLEY_OPENAI_BASE_URL is not set) is 'localhost:11434/v1'" in stderr


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("not-a-url", "not an http:// or https:// URL"),
        ("localhost:11434/v1", "not an http:// or https:// URL"),
        ("ftp://example.com/v1", "not an http:// or https:// URL"),
        ("http:///v1", "names no host"),
        ("http://localhost:99999/v1", "whose port is not a number up to 65535"),
        ("http://localhost:11434/v1 ", "holds a space"),
    ],
)
def test_bad_base_urls(url: str, problem: str) -> None:
    with pytest.raises(ValidationError, match="PARLEY_OPENAI_BASE_URL") as error:
        Settings(openai_base_url=url)
    assert problem in str(error.value)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("not-a-url", "not a redis://, rediss:// or unix:// URL"),
        ("http://localhost:6379", "not a redis://, rediss:// or unix:// URL"),
        ("redis://", "names no host"),
        ("redis://localhost:port/0", "whose port is not a number up to 65535"),
        ("redis://localhost:6379/zero", "the database after the host must be a number"),
        ("unix://", "names no socket"),
    ],
)
def test_bad_redis_urls(url: str, problem: str) -> None:
    with pytest.raises(ValidationError, match="PARLEY_REDIS_URL") as error:
        Settings(redis_url=url)
    assert problem in str(error.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://parley-redis:6379/0",
        "rediss://user:secret@redis.example.com:6380",
        "redis://:secret@[::1]:6379/2",
        "unix://{socket}?db=1",
    ],
)
def test_good_redis_urls(url: str, tmp_path: Path) -> None:
    url = url.format(socket=tmp_path / "redis.sock")
    assert Settings(redis_url=url).redis_url == url


@pytest.mark.parametrize(
    "url", ["http://localhost:11434/v1", "https://api.openai.com/v1", "http://[::1]:8081/v1", "HTTP://host"]
)
def test_good_base_urls(url: str) -> None:
    assert Settings(openai_base_url=url).openai_base_url == url


def test_a_password_in_a_bad_url_is_not_shown() -> None:
    with pytest.raises(ValidationError) as error:
        Settings(redis_url="redis://user:hunter22@localhost:port/0")
    assert "hunter22" not in str(error.value) and "'redis://***@localhost:port/0'" in str(error.value)
