"""The cores the embedded engines share: background work waits while urgent work runs."""

from __future__ import annotations

import threading
import time

from service.engines.cpu import CpuShare


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
