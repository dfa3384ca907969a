"""The voice-to-voice benchmark's pieces that need no model: word error rate, the last speech
sample, and the report section merged into an existing RESULTS.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.report import Report
from benchmarks.voice import VoiceResult, VoiceTurn, last_speech_byte, word_error_rate
from tests.fakes import loud, quiet


def test_word_error_rate_ignores_case_and_punctuation() -> None:
    assert word_error_rate("What is the capital of France?", "what is the capital of france") == 0
    assert word_error_rate("What is the capital of France?", "What is the capital on France?") == pytest.approx(1 / 6)
    assert word_error_rate("How do plants make food?", "Hard to plant, make food.") == pytest.approx(3 / 5)
    assert word_error_rate("Say hi.", "") == 1
    assert word_error_rate("Say hi.", "Say hi there, you.") == 1


def test_last_speech_byte_is_past_the_last_loud_sample() -> None:
    pcm = quiet(100) + loud(500) + quiet(300)
    assert abs(last_speech_byte(pcm) - len(quiet(100) + loud(500))) <= 2 * 60  # the tone's last loud sample


def test_voice_section_replaces_its_old_self_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# R\n\n- **Targets:** old\n\n## 3. Embedded\n\nkept\n\n## 4. Capacity and memory\n\nalso kept\n")
    turn = VoiceTurn("Hi there?", "Hi there.", 0.0, 1.0, 900.0, 500.0, 890, 200, 60, 300, "TURN_END_REASON_COMPLETED")
    report = Report("2 cores", "2026-11-26", "abc", "python -m benchmarks.bench --only voice", "cloud", 3)
    report.add_voice(VoiceResult("espeak-ng en-us", [turn], []))
    report.merge_voice(path)
    report.merge_voice(path)  # a second run replaces the first
    text = path.read_text()
    assert text.count("## 3b. Voice to voice") == 1 and "kept" in text and "also kept" in text
    assert text.index("## 3. Embedded") < text.index("## 3b.") < text.index("## 4. Capacity")
    assert "| end of speech → first reply audio (client) | 900 ms | 900 ms |" in text
    assert "Mean WER 0.000 over 1 questions" in text and "p50 ≤ 1.2 s" in text
