"""Clients that stop granting HTTP/2 flow-control window: their streams still end, are counted until
they have, and leave no memory behind.

The stuck client speaks HTTP/2 itself (the ``h2`` package, plain TCP with prior knowledge): it opens a
Converse stream, asks a question, and from then on grants no window; it still answers the
connection's SETTINGS and PINGs, as any HTTP/2 library does. (A gRPC client whose application reads
nothing still grants window while its library buffers what comes.)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc
from service.servicer import StreamLimits
from tests.conftest import (
    free_port,
    start,
    start_harness,
    start_service_process,
    stop_harness,
    user,
    wait_for,
    wait_listening,
)
from tests.fakes import FakeLLM, FakeTTS

LONG_REPLY = "This reply is long enough to fill every buffer on the way. " * 40


def grpc_frame(message: pb.ConverseRequest) -> bytes:
    data = message.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


class StuckClient:
    """A Converse stream whose client grants ``window`` bytes of flow-control window, and never more."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.events: list[h2.events.Event] = []
        self._reading: asyncio.Task[None] | None = None

    async def open(self, port: int) -> StuckClient:
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", port)
        self._h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self._h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.window}
        )
        self._h2.initiate_connection()
        stream_id = self._h2.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", f"127.0.0.1:{port}"),
            (":path", "/parley.v1.VoiceService/Converse"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        self._h2.send_headers(stream_id, headers)
        self._h2.send_data(stream_id, grpc_frame(start()) + grpc_frame(user("Talk, while I do not listen.")))
        self._writer.write(self._h2.data_to_send())
        self._reading = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while data := await self._reader.read(65536):
            self.events += self._h2.receive_data(data)  # (queues the SETTINGS and PING acknowledgements)
            self._writer.write(self._h2.data_to_send())  # never a WINDOW_UPDATE: received data is not acknowledged

    @property
    def ended(self) -> bool:
        """The server ended the stream: trailers (a status), or RST_STREAM."""
        return any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) for e in self.events)

    @property
    def status(self) -> int | None:
        """The grpc-status of the trailers, if any came."""
        for event in self.events:
            if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                for name, value in event.headers:
                    if name == "grpc-status":
                        return int(value)
        return None

    @property
    def received(self) -> int:
        """Bytes of messages received."""
        return sum(e.flow_controlled_length for e in self.events if isinstance(e, h2.events.DataReceived))

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


# 16 bytes: not even the first message fits, and gRPC core refuses the status (its first message's batch
# is still in flight); 1000: the first messages go out, then the status waits behind the next one.
@pytest.mark.parametrize("window", [16, 1000])
async def test_a_stream_whose_client_grants_no_window_ends_and_is_counted_until_it_has(window: int) -> None:
    h = await start_harness(
        FakeLLM(reply=LONG_REPLY), FakeTTS(ms_per_char=300), limits=StreamLimits(max_streams=2, send_timeout_s=1.0)
    )
    servicer = h.running.servicer
    clients: list[StuckClient] = []

    async def admitted(count: int) -> list[StuckClient]:
        opened = [await StuckClient(window).open(h.running.port) for _ in range(count)]
        clients.extend(opened)
        await wait_for(lambda: servicer.active_streams == count, timeout_s=10)
        return opened

    async def ended(opened: list[StuckClient]) -> None:
        await wait_for(lambda: all(c.ended for c in opened), timeout_s=10)

    try:
        for count in (2, 2, 1):  # five stuck clients in all, at most two at a time
            opened = await admitted(count)
            if len(clients) == 2:
                # They are counted while they last: one more is refused.
                refused = await StuckClient(window).open(h.running.port)
                await ended([refused])
                assert refused.status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
                await refused.close()
            # The send timeout fires; the streams end (and only then are they counted out)...
            await wait_for(lambda: servicer.active_streams == 0, timeout_s=20)
            assert h.llm.open_streams == 0 and h.tts.open_streams == 0
            # ... the cancellation reaches the client at once, or, for the stream gRPC accepted last, once
            # it has accepted another call (it holds on to the latest one until then).
            await h.stub.ListVoices(pb.ListVoicesRequest())
            await ended(opened)
            assert all(c.status == grpc.StatusCode.CANCELLED.value[0] for c in opened)
        # All five were admitted although two at most may run: each was counted out when it ended.
        assert len(clients) == 5 and all(c.ended for c in clients)
        # The server still serves others.
        responses = [r async for r in h.stub.Converse(iter([start(), user("Still there?")]))]
        assert responses[-1].turn_ended.reason == pb.TURN_END_REASON_COMPLETED
    finally:
        for client in clients:
            await client.close()
        await stop_harness(h)


def rss_kb(pid: int) -> int:
    """The process's resident set size (VmRSS), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


async def test_the_memory_of_streams_whose_clients_grant_no_window_is_freed() -> None:
    port, batch = free_port(), 50
    service = start_service_process(
        port=str(port),
        host="127.0.0.1",
        llm="scripted",
        tts="scripted",
        scripted_profile="quick",
        max_streams=str(batch),
        send_timeout_s="0.5",
    )
    output, lines = service.stdout, list[str]()
    assert output is not None
    draining = threading.Thread(target=lambda: lines.extend(output), daemon=True)  # (the log, once it listens)
    try:
        log = await asyncio.to_thread(wait_listening, service)
        draining.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = voice_pb2_grpc.VoiceServiceStub(channel)

            async def stuck_batch(window: int) -> None:
                """``batch`` stuck streams at once, until each has ended; then their clients go."""
                clients = [await StuckClient(window).open(port) for _ in range(batch)]
                try:
                    async with asyncio.timeout(20):
                        while not all(c.ended for c in clients):
                            await asyncio.sleep(0.25)
                            await stub.ListVoices(pb.ListVoicesRequest())  # (gRPC lets go of its latest call)
                finally:
                    for client in clients:
                        await client.close()

            for window in (16, 1000):  # the allocator reaches its working size
                await stuck_batch(window)
            await asyncio.sleep(1.5)
            start_kb = rss_kb(service.pid)
            for window in (16, 1000, 16):  # 150 more
                await stuck_batch(window)
            # Each held a few hundred KB (its queued audio); left to Python's own full collections (in
            # reference cycles, as they were once), 150 of them keep the process some 40 MB larger for a
            # while. Freed as they end, it is back to its size, give or take the allocator's noise: up to
            # 23 MB on this project's machine (seen at the code of 042b003 too, 2 runs in 5 over 20 MB),
            # so the bound is 30 MB, still well under a leak.
            for _ in range(20):  # (the last calls are let go within a second or two)
                if (end_kb := rss_kb(service.pid)) <= start_kb + 30_000:
                    break
                await asyncio.sleep(0.5)
            assert end_kb <= start_kb + 30_000, f"VmRSS {start_kb} kB before, {end_kb} kB after 150 stuck streams"
        assert not [line for line in lines if "WARNING" in line or "ERROR" in line], log + "".join(lines)
    finally:
        service.terminate()
        service.wait(timeout=30)
        if draining.is_alive():
            draining.join(timeout=10)
        output.close()
