"""OpenAI's speech voices: the one list, kept free of heavy imports so that the settings can use it
without loading the OpenAI client."""

from __future__ import annotations

__all__ = ["OPENAI_VOICES"]

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")
"""The voices ListVoices offers with the openai TTS engine unless configured otherwise."""
