"""Builds the configured engines, once, at start-up."""

from __future__ import annotations

import logging
import os
import time

from service.config import Settings
from service.core.engine import LLMEngine, TTSEngine

__all__ = ["load_engines"]

log = logging.getLogger(__name__)


def load_engines(settings: Settings) -> tuple[LLMEngine, TTSEngine]:
    """Load the LLM and TTS engines the settings name, logging what was loaded and how long it took.

    Raises :class:`service.errors.EngineError` when a model cannot be loaded.
    """
    from service.engines.local_llm import LocalLLM, LocalLLMOptions, default_model_path
    from service.engines.piper_tts import PiperOptions, PiperTTS, default_voice_path

    began = time.perf_counter()
    model_path = settings.llm_model_path or default_model_path()
    llm = LocalLLM(LocalLLMOptions(model_path, settings.llm_context_size, settings.llm_threads or os.cpu_count() or 1))
    template = "its chat template" if llm.uses_chat_template else "a transcript prompt"
    log.info(
        "LLM %s loaded from %s in %.1f s (prompted with %s)",
        llm.name,
        model_path,
        time.perf_counter() - began,
        template,
    )

    began = time.perf_counter()
    voice_path = settings.piper_voice_path or default_voice_path()
    tts = PiperTTS(PiperOptions(voice_path, settings.piper_voice_dir, settings.tts_workers))
    voices = ", ".join(f"{v.id} ({v.sample_rate_hz} Hz)" for v in tts.voices())
    log.info("TTS %s loaded in %.1f s: %s", tts.name, time.perf_counter() - began, voices)
    return llm, tts
