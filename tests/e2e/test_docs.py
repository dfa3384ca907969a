"""The README stays true: it documents every setting, and opens with the two commands."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_is_documented(name: str) -> None:
    assert f"`PARLEY_{name.upper()}`" in README
    assert f"`--{name.replace('_', '-')}`" in README


def test_readme_opens_with_run_and_test() -> None:
    opening = README.split("```")[1]
    assert "make run" in opening and "make test" in opening
