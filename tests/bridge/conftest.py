"""The page in real headless Chromium (Debian's ``chromium``, driven by Playwright): shared fixtures and
helpers for the browser tests. Screenshots go to ``test-artifacts/``."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from service.auth import KeyRing
from service.core.hearing import VoiceInput
from service.core.outbox import OutboxLimits
from service.core.settings import SessionDefaults
from service.core.store import Claim, StoredSession
from service.server import RunningServer, start_server
from service.servicer import StreamLimits
from service.stores.memory import MemoryStore
from tests.conftest import free_port
from tests.fakes import FakeDetector, FakeLLM, FakeSTT, FakeTTS
from ws_bridge.server import Bridge, BridgeOptions

CHROMIUM = shutil.which("chromium") or ""
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--autoplay-policy=no-user-gesture-required",
]
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}

needs_chromium = pytest.mark.skipif(
    not CHROMIUM, reason="Debian's chromium is not installed (make test installs it as root)"
)

NewPage = Callable[..., Awaitable[Any]]


@pytest.fixture
async def new_page() -> AsyncIterator[NewPage]:
    """Open pages (each in its own browser context) in one headless Chromium; phone-sized by default."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)

        async def open_page(viewport: dict[str, int] | None = None) -> Any:
            context = await browser.new_context(viewport=viewport or PHONE)
            page = await context.new_page()
            page.set_default_timeout(15_000)
            return page

        yield open_page
        await browser.close()


@pytest.fixture
async def page(new_page: NewPage) -> Any:
    return await new_page()


async def ask(page: Any, text: str) -> None:
    await page.fill("#text", text)
    await page.click("#send")


async def screenshots(page: Any, name: str) -> None:
    """``name-phone.png`` and ``name-desktop.png`` in test-artifacts/, then the viewport as it was."""
    ARTIFACTS.mkdir(exist_ok=True)
    before = page.viewport_size
    for label, size in (("phone", PHONE), ("desktop", DESKTOP)):
        await page.set_viewport_size(size)
        await page.evaluate("document.querySelector('#log').scrollTop = 1e9")
        await page.wait_for_timeout(150)
        await page.screenshot(path=str(ARTIFACTS / f"{name}-{label}.png"))
    await page.set_viewport_size(before)


class RecordingStore(MemoryStore):
    """A memory store that records the sessions created and resumed."""

    def __init__(self) -> None:
        super().__init__(ttl_s=3600)
        self.created: list[str] = []
        self.resumed: list[tuple[str, bool]] = []

    async def create(self, session: StoredSession) -> Claim:
        self.created.append(session.session_id)
        return await super().create(session)

    async def resume(self, session_id: str, principal: str = "") -> tuple[StoredSession, Claim] | None:
        resumed = await super().resume(session_id, principal)
        self.resumed.append((session_id, resumed is not None))
        return resumed


@dataclass
class Site:
    """The service (fake engines, a recording store) and the bridge, each on a fixed loopback port so
    that either can be stopped and started again where the page expects it. The service takes voice
    input (a fake detector and STT engine: the page opens its sessions with it) unless ``voice`` is
    false."""

    llm: FakeLLM
    tts: FakeTTS
    voice: bool = True
    store: RecordingStore = field(default_factory=RecordingStore)
    service_port: int = field(default_factory=free_port)
    bridge_port: int = field(default_factory=free_port)
    service: RunningServer | None = None
    bridge: Bridge | None = None
    keys: KeyRing | None = None
    token_secret: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.bridge_port}/"

    async def start_service(self) -> None:
        assert self.service is None
        self.service = await start_server(
            self.llm,
            self.tts,
            host="127.0.0.1",
            port=self.service_port,
            defaults=SessionDefaults(outbox=OutboxLimits(max_message_ms=100)),
            limits=StreamLimits(),
            store=self.store,
            voice_input=VoiceInput(FakeDetector(), FakeSTT()) if self.voice else None,
            keys=self.keys,
            token_secret=self.token_secret,
        )

    async def stop_service(self, grace_s: float = 1.0) -> None:
        if self.service is not None:
            service, self.service = self.service, None
            await service.stop(grace_s)

    async def start_bridge(self) -> None:
        assert self.bridge is None
        options = BridgeOptions(grpc_target=f"127.0.0.1:{self.service_port}", host="127.0.0.1", port=self.bridge_port)
        self.bridge = await Bridge(options).start()

    async def stop_bridge(self) -> None:
        if self.bridge is not None:
            bridge, self.bridge = self.bridge, None
            await bridge.aclose()

    async def aclose(self) -> None:
        await self.stop_bridge()
        await self.stop_service(0)
        await self.llm.aclose()
        await self.tts.aclose()


@pytest.fixture
async def make_site() -> AsyncIterator[Callable[..., Awaitable[Site]]]:
    sites: list[Site] = []

    async def make(
        llm: FakeLLM,
        tts: FakeTTS,
        *,
        service: bool = True,
        voice: bool = True,
        keys: KeyRing | None = None,
        token_secret: str = "",
    ) -> Site:
        site = Site(llm, tts, voice=voice, keys=keys, token_secret=token_secret)
        sites.append(site)
        if service:
            await site.start_service()
        await site.start_bridge()
        return site

    yield make
    for site in sites:
        await site.aclose()
