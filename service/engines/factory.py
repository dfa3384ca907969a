"""Builds the configured engines, once, at start-up."""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from service.config import Settings
from service.core.engine import LLMEngine, STTEngine, TTSEngine
from service.engines.cpu import CpuShare
from service.engines.retry import RetryPolicy
from service.errors import EngineError

if TYPE_CHECKING:
    from service.core.hearing import VoiceInput
    from service.engines.openai_client import OpenAIConnection

__all__ = ["load_engines", "load_stt", "openai_connection", "tts_threads_beside"]

log = logging.getLogger(__name__)


def load_engines(settings: Settings) -> tuple[LLMEngine, TTSEngine]:
    """Load the LLM and TTS engines the settings name, logging what was loaded and how long it took.

    Raises :class:`service.errors.EngineError` when an engine cannot be set up.
    """
    # Embedded engines share the cores: the LLM waits while a first segment is synthesized.
    cpu = CpuShare() if settings.llm == "local" and settings.tts == "piper" and settings.share_cores else None
    began = time.perf_counter()
    llm = _load_llm(settings, cpu)
    log.info("LLM %s ready in %.1f s", llm.name, time.perf_counter() - began)
    began = time.perf_counter()
    tts = _load_tts(settings, cpu)
    voices = ", ".join(f"{v.id} ({v.sample_rate_hz} Hz)" for v in tts.voices())
    log.info("TTS %s ready in %.1f s: %s", tts.name, time.perf_counter() - began, voices)
    return llm, tts


def _load_llm(settings: Settings, cpu: CpuShare | None) -> LLMEngine:
    if settings.llm == "scripted":
        from service.engines.scripted import PROFILES, ScriptedLLM

        return ScriptedLLM(PROFILES[settings.scripted_profile], settings.scripted_profile)
    if settings.llm == "openai":
        from service.engines.openai_llm import OpenAILLM, OpenAILLMOptions

        connection = openai_connection(settings)
        log.info("LLM openai: model %s at %s", settings.openai_model, connection.server_name)
        return OpenAILLM(
            connection,
            OpenAILLMOptions(
                settings.openai_model, settings.openai_stall_timeout_s, _retry(settings), settings.openai_stream_usage
            ),
        )
    from service.engines.local_llm import LocalLLM, LocalLLMOptions, default_model_path

    model_path = settings.llm_model_path or default_model_path()
    llm = LocalLLM(
        LocalLLMOptions(
            model_path,
            settings.llm_context_size,
            settings.llm_threads or os.cpu_count() or 1,
            cpu=cpu,
            warm_system_prompt=settings.system_prompt,
        )
    )
    template = "its chat template" if llm.uses_chat_template else "a transcript prompt"
    log.info("LLM local: %s (prompted with %s)", model_path, template)
    return llm


def _load_tts(settings: Settings, cpu: CpuShare | None) -> TTSEngine:
    if settings.tts == "scripted":
        from service.engines.scripted import PROFILES, ScriptedTTS

        return ScriptedTTS(PROFILES[settings.scripted_profile])
    if settings.tts == "openai":
        from service.engines.openai_tts import OpenAITTS, OpenAITTSOptions

        voices = tuple(v.strip() for v in settings.openai_tts_voices.split(",") if v.strip())
        return OpenAITTS(
            openai_connection(settings),
            OpenAITTSOptions(
                model=settings.openai_tts_model,
                voice=settings.openai_tts_voice,
                voices=voices,
                speed=settings.openai_tts_speed,
                instructions=settings.openai_tts_instructions,
                stall_timeout_s=settings.openai_stall_timeout_s,
                retry=_retry(settings),
            ),
        )
    from service.engines.piper_tts import PiperOptions, PiperTTS, default_voice_path

    voice_path = settings.piper_voice_path or default_voice_path()
    threads = settings.tts_threads or tts_threads_beside(settings)
    return PiperTTS(PiperOptions(voice_path, settings.piper_voice_dir, settings.tts_workers, threads, cpu))


def load_stt(settings: Settings) -> STTEngine:
    """Load the STT engine the settings name, logging what was loaded and how long it took.

    Raises :class:`service.errors.EngineError` when it cannot be set up.
    """
    began = time.perf_counter()
    language = settings.stt_language or None
    stt: STTEngine
    if settings.stt == "openai":
        from service.engines.openai_stt import OpenAISTT, OpenAISTTOptions

        connection = openai_connection(settings)
        log.info("STT openai: model %s at %s", settings.openai_stt_model, connection.server_name)
        stt = OpenAISTT(
            connection,
            OpenAISTTOptions(settings.openai_stt_model, language, settings.openai_stall_timeout_s, _retry(settings)),
        )
    else:
        from service.engines.whisper_stt import WhisperOptions, WhisperSTT, default_model_dir

        model_path = settings.stt_model_path or default_model_dir()
        log.info("STT whisper: %s", model_path)
        stt = WhisperSTT(WhisperOptions(model_path, threads=settings.stt_threads, language=language))
    log.info("STT %s ready in %.1f s (language: %s)", stt.name, time.perf_counter() - began, language or "detected")
    return stt


def tts_threads_beside(settings: Settings, cores: int | None = None) -> int:
    """Piper's threads when none are configured: one per core (0, onnxruntime's default), except
    beside an LLM server on this machine (an OpenAI-compatible server on a loopback address), which
    generates while Piper speaks a reply's first segment: then half the cores, so the two do not
    fight over every core (on 2 cores, with llama.cpp's server generating on one, a first segment
    was synthesized in 117 ms with one thread against 177 ms with two; benchmarks/PEERS.md)."""
    if settings.llm != "openai":
        return 0
    host = urlsplit(settings.openai_base_url or os.environ.get("OPENAI_BASE_URL") or "").hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return 0
    threads = max(1, (cores or os.cpu_count() or 1) // 2)
    log.info("Piper uses %d thread(s): the LLM server at %s shares this machine's cores", threads, host)
    return threads


def _retry(settings: Settings) -> RetryPolicy:
    return RetryPolicy(attempts=settings.openai_max_attempts)


def openai_connection(settings: Settings, environ: Mapping[str, str] | None = None) -> OpenAIConnection:
    """The OpenAI connection from the settings and the environment. The API key comes from
    ``PARLEY_OPENAI_API_KEY``, ``OPENAI_API_KEY`` or the key file, never from a client or a flag."""
    from service.engines.openai_client import OpenAIConnection

    env = os.environ if environ is None else environ
    base_url = settings.openai_base_url or env.get("OPENAI_BASE_URL") or None
    key = env.get("PARLEY_OPENAI_API_KEY") or env.get("OPENAI_API_KEY")
    if settings.openai_api_key_file is not None:
        try:
            key = settings.openai_api_key_file.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise EngineError(f"cannot read the API key file {settings.openai_api_key_file}: {error}") from error
    if not key:
        if base_url is None:
            raise EngineError(
                "the openai engines need an API key: set OPENAI_API_KEY (or PARLEY_OPENAI_API_KEY_FILE), "
                "or PARLEY_OPENAI_BASE_URL for a compatible server that needs none"
            )
        key = "no-key"  # compatible servers without authentication still get a bearer header
    return OpenAIConnection(
        api_key=key,
        base_url=base_url,
        organization=settings.openai_organization or env.get("OPENAI_ORG_ID"),
        project=settings.openai_project or env.get("OPENAI_PROJECT_ID"),
        timeout_s=settings.openai_timeout_s,
        extra_headers=settings.extra_headers(),
    )


def load_voice_input(settings: Settings) -> VoiceInput | None:
    """The speech detector (Silero VAD) and the STT engine, or None with ``PARLEY_STT=none``.

    Raises :class:`service.errors.EngineError` when one cannot be set up."""
    if settings.stt == "none":
        log.info("voice input off (PARLEY_STT=none): sessions take text only")
        return None
    from service.core.hearing import VoiceInput
    from service.engines.silero_vad import SileroOptions, SileroVAD

    began = time.perf_counter()
    detector = SileroVAD(SileroOptions())
    log.info("VAD silero ready in %.2f s", time.perf_counter() - began)
    return VoiceInput(detector, load_stt(settings), settings.stt_language)
