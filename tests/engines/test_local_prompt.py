"""How the embedded base model is prompted: a transcript with examples, ending on the assistant."""

from __future__ import annotations

from service.core.engine import Message
from service.engines.local_llm import transcript_prompt


def test_transcript_has_system_examples_and_cue() -> None:
    prompt = transcript_prompt((Message("system", "Be brief."), Message("user", "Tell me\na joke.")))
    lines = prompt.splitlines()
    assert lines[0] == "Be brief."
    assert "User: What is the capital of France?" in lines  # the built-in example exchange
    assert lines[-3:] == ["", "User: Tell me a joke.", "Assistant:"]


def test_examples_go_once_the_conversation_has_a_reply() -> None:
    # Asked "What was the first thing I asked?", the model answered from the examples: once there
    # is a real exchange, they are not in the prompt.
    prompt = transcript_prompt(
        (
            Message("system", "Be brief."),
            Message("user", "Hi there"),
            Message("assistant", "Hello! How can I help?"),
            Message("user", "What was the first thing I asked?"),
        )
    )
    assert "capital of France" not in prompt and "cup of tea" not in prompt
    assert prompt.splitlines() == [
        "Be brief.",
        "",
        "User: Hi there",
        "Assistant: Hello! How can I help?",
        "",
        "User: What was the first thing I asked?",
        "Assistant:",
    ]


def test_an_interrupted_reply_trails_off_without_a_note() -> None:
    prompt = transcript_prompt(
        (
            Message("user", "Tell me a story."),
            Message("assistant", "Once upon a", interrupted=True),
            Message("user", "Hello?"),
            Message("assistant", "", interrupted=True),
            Message("user", "Go on."),
        )
    )
    lines = prompt.splitlines()
    assert "Assistant: Once upon a…" in lines
    assert lines[-4:] == ["", "User: Hello?", "User: Go on.", "Assistant:"]  # (the reply heard not at all: left out)
    assert "[" not in prompt


def test_a_reply_heard_not_at_all_leaves_the_examples_in() -> None:
    # Shown "Assistant: …" for a reply stopped before its first audio, and no example, Gemma 3 270M
    # answered "…" to every later question of the session.
    prompt = transcript_prompt(
        (
            Message("user", "Describe the ocean."),
            Message("assistant", "", interrupted=True),
            Message("user", "Tell me about mountains."),
            Message("assistant", "…"),  # (a reply of no word: left out too)
            Message("user", "And rivers?"),
        )
    )
    assert "User: What is the capital of France?" in prompt.splitlines()  # the built-in example exchange
    assert "…" not in prompt
    assert prompt.endswith("User: Describe the ocean.\nUser: Tell me about mountains.\nUser: And rivers?\nAssistant:")


def test_transcript_without_system_prompt_still_frames_the_conversation() -> None:
    prompt = transcript_prompt((Message("user", "Hi"),))
    assert prompt.startswith("A conversation with a helpful voice assistant.")
    assert prompt.endswith("User: Hi\nAssistant:")


def test_chat_template_messages_alternate_starting_with_the_user() -> None:
    from service.engines.local_llm import alternating

    got = alternating(
        (
            Message("system", "Be brief."),
            Message("assistant", "Welcome aboard."),  # read aloud with speak_text before any question
            Message("user", "Hi"),
            Message("assistant", "Hello."),
            Message("assistant", "Read aloud too."),
            Message("user", "Next?"),
        )
    )
    assert [m.role for m in got] == ["system", "user", "assistant", "user"]
    assert got[0].content == "Be brief.\n\nEarlier you said: Welcome aboard."
    assert got[2].content == "Hello.\nRead aloud too."


def test_settings_reject_a_reply_longer_than_the_context() -> None:
    import pytest
    from pydantic import ValidationError

    from service.config import Settings

    with pytest.raises(ValidationError, match="must be smaller than PARLEY_LLM_CONTEXT_SIZE"):
        Settings(llm_max_tokens=4096, llm_context_size=2048)
