"""The cores the embedded engines share: background work waits while urgent work runs."""

from __future__ import annotations

import threading
import time

import pytest

from service.config import Settings
from service.engines.cpu import CpuShare
from service.engines.factory import tts_threads_beside


def test_nothing_urgent_means_no_wait() -> None:
    cpu = CpuShare()
    began = time.monotonic()
    for _ in range(1000):
        cpu.yield_to_urgent()
    assert time.monotonic() - began < 0.5
    assert cpu.waited_s == 0


def test_background_work_waits_until_urgent_work_ends() -> None:
    cpu = CpuShare(max_wait_s=5.0)
    inside, release = threading.Event(), threading.Event()
    resumed: list[float] = []

    def urgent() -> None:
        with cpu.urgent(), cpu.urgent():  # nested: the count, not a flag
            inside.set()
            release.wait(5)

    def background() -> None:
        inside.wait(5)
        cpu.yield_to_urgent()
        resumed.append(time.monotonic())

    threads = [threading.Thread(target=urgent), threading.Thread(target=background)]
    for thread in threads:
        thread.start()
    inside.wait(5)
    time.sleep(0.2)
    assert resumed == []  # still waiting
    released_at = time.monotonic()
    release.set()
    for thread in threads:
        thread.join(5)
    assert resumed and resumed[0] >= released_at
    assert cpu.waited_s >= 0.2


def test_the_wait_is_bounded() -> None:
    cpu = CpuShare(max_wait_s=0.1)
    with cpu.urgent():
        began = time.monotonic()
        cpu.yield_to_urgent()  # a stuck synthesis cannot stall the LLM for ever
        assert 0.09 <= time.monotonic() - began < 2


@pytest.mark.parametrize(
    ("llm", "base_url", "threads"),
    [
        ("local", None, 0),  # embedded: the LLM waits for Piper instead (CpuShare)
        ("openai", None, 0),  # OpenAI's cloud
        ("openai", "https://llm.example.com/v1", 0),
        ("openai", "http://127.0.0.1:8081/v1", 4),  # a server on this machine: half the cores
        ("openai", "http://localhost:11434/v1", 4),
        ("openai", "http://[::1]:8000/v1", 4),
        ("openai", "http://10.0.0.5:8000/v1", 0),
    ],
)
def test_piper_leaves_cores_to_an_llm_server_on_this_machine(
    llm: str, base_url: str | None, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    settings = Settings(_cli_parse_args=False, llm=llm, openai_base_url=base_url)  # type: ignore[call-arg]
    assert tts_threads_beside(settings, cores=8) == threads
