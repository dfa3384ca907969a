"""Settings. Each is an environment variable ``PARLEY_<NAME>`` and a flag ``--<name>``.

Flags win over the environment, which wins over the defaults. ``python -m service --help`` lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.core.session import SessionDefaults

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Parley's gRPC voice-reply service. Every flag is also an environment variable PARLEY_<NAME>
    (for example --port / PARLEY_PORT); flags win."""

    model_config = SettingsConfigDict(
        env_prefix="PARLEY_",
        cli_kebab_case=True,
        cli_prog_name="python -m service",
        cli_implicit_flags=True,
        frozen=True,
    )

    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port.")
    llm: Literal["local"] = Field("local", description="LLM engine.")
    tts: Literal["piper"] = Field("piper", description="TTS engine.")
    llm_model_path: Path | None = Field(
        None, description="GGUF model for the local LLM. Default: Gemma 3 270M from its PyPI package."
    )
    llm_context_size: int = Field(2048, ge=256, description="Context window of the local LLM, in tokens.")
    llm_threads: int | None = Field(None, ge=1, description="CPU threads for the local LLM. Default: all cores.")
    llm_temperature: float = Field(0.7, ge=0, le=2, description="Default sampling temperature.")
    llm_max_tokens: int = Field(200, ge=1, description="Longest reply in tokens (a client may ask for fewer).")
    system_prompt: str = Field(SessionDefaults.system_prompt, description="System prompt when a client sends none.")
    piper_voice_path: Path | None = Field(
        None,
        description="Default Piper voice (.onnx, with its .onnx.json beside it). Default: en_US-joe-medium (PyPI).",
    )
    piper_voice_dir: Path | None = Field(None, description="Folder of further Piper voices (*.onnx) to offer.")
    tts_workers: int = Field(2, ge=1, description="Syntheses that may run at once.")
    lookahead_segments: int = Field(
        2, ge=0, description="Segments synthesized ahead of the one whose audio is being sent."
    )
    audio_chunk_ms: int = Field(200, ge=10, le=2000, description="Longest audio message, in milliseconds.")
    max_text_chars: int = Field(4000, ge=1, description="Longest user_text or speak turn, in characters.")
    idle_timeout_s: float = Field(
        600.0, gt=0, description="Close a stream after this long with no message and no turn."
    )
    max_streams: int = Field(100, ge=1, description="Concurrent Converse streams; more get RESOURCE_EXHAUSTED.")
    shutdown_grace_s: float = Field(10.0, ge=0, description="On SIGTERM/SIGINT, time given to streams in flight.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")

    @model_validator(mode="after")
    def _reply_fits_the_context(self) -> Settings:
        if self.llm_max_tokens >= self.llm_context_size:
            raise ValueError(
                f"llm_max_tokens ({self.llm_max_tokens}) must be smaller than llm_context_size "
                f"({self.llm_context_size}), or no prompt fits"
            )
        return self
