"""How the embedded base model is prompted: a transcript with examples, ending on the assistant."""

from __future__ import annotations

from service.core.engine import Message
from service.engines.local_llm import transcript_prompt


def test_transcript_has_system_examples_history_and_cue() -> None:
    prompt = transcript_prompt(
        (
            Message("system", "Be brief."),
            Message("user", "Hi there"),
            Message("assistant", "Hello! How can I help?"),
            Message("user", "Tell me\na joke."),
        )
    )
    lines = prompt.splitlines()
    assert lines[0] == "Be brief."
    assert "User: What is the capital of France?" in lines  # the built-in example exchange
    assert lines[-3:] == ["", "User: Tell me a joke.", "Assistant:"]
    assert "User: Hi there" in lines and "Assistant: Hello! How can I help?" in lines
    assert lines.index("User: Hi there") > lines.index("User: What is the capital of France?")


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

    with pytest.raises(ValidationError, match="must be smaller than llm_context_size"):
        Settings(llm_max_tokens=4096, llm_context_size=2048)
