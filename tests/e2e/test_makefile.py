"""Which interpreter the Makefile makes `.venv` from: the system's own python3 when it can make a venv
(a distribution's optimized build), before a python3 found first on PATH; PYTHON=... overrides both."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


# What a make running these tests (`make test PYTHON=...`) would hand down to the make run here.
_INHERITED = {"PYTHON", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES", "MAKELEVEL"}


def _env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in _INHERITED}, **extra}


def _chosen(env: dict[str, str], *arguments: str) -> str:
    """The PYTHON the Makefile settles on (its database, printed without running a recipe)."""
    result = subprocess.run(
        ["make", "--no-print-directory", "-p", "-n", "-q", "setup", *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"^PYTHON :?= (.*)$", result.stdout, re.MULTILINE)
    assert found, result.stdout[-2000:] + result.stderr
    return found.group(1)


def _system_python() -> str | None:
    """The system's python3 (the default PATH's, as make's shell finds it), if it is 3.11 or newer
    and can make a venv."""
    found = subprocess.run(["/bin/sh", "-c", "command -p -v python3"], capture_output=True, text=True).stdout.strip()
    if not found:
        return None
    usable = subprocess.run(
        [found, "-c", "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))"], capture_output=True
    )
    return found if usable.returncode == 0 else None


def _shadow(directory: Path) -> dict[str, str]:
    """An environment whose PATH finds a python3 of ``directory`` first, as pyenv's shim is found."""
    shadow = directory / "python3"
    shadow.write_text("#!/bin/sh\nexit 1\n")
    shadow.chmod(0o755)
    return _env(PATH=f"{directory}{os.pathsep}{os.environ.get('PATH', '')}")


def test_the_systems_python3_comes_before_one_on_path(tmp_path: Path) -> None:
    system = _system_python()
    if system is None:
        pytest.skip("the system's python3 cannot make a 3.11+ venv here")
    assert os.path.samefile(_chosen(_shadow(tmp_path)), system)


def test_an_empty_python_is_no_choice(tmp_path: Path) -> None:
    system = _system_python()
    if system is None:
        pytest.skip("the system's python3 cannot make a 3.11+ venv here")
    env = _shadow(tmp_path)
    assert os.path.samefile(_chosen({**env, "PYTHON": ""}), system)
    assert os.path.samefile(_chosen(env, "PYTHON="), system)


def test_python_on_the_command_line_or_in_the_environment_wins(tmp_path: Path) -> None:
    env = _shadow(tmp_path)
    assert _chosen({**env, "PYTHON": "python3.99"}) == "python3.99"
    assert _chosen(env, "PYTHON=python3.98") == "python3.98"
    assert _chosen({**env, "PYTHON": "python3.99"}, "PYTHON=python3.98") == "python3.98"


def test_setup_refuses_a_python_older_than_3_11(tmp_path: Path) -> None:
    old = tmp_path / "python-old"  # answers as an interpreter older than 3.11 does to the Makefile's check
    old.write_text("#!/bin/sh\nexit 1\n")
    old.chmod(0o755)
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    result = subprocess.run(
        ["make", "--no-print-directory", "setup", f"PYTHON={old}"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"Parley needs Python 3.11 or newer, which {old} is not" in result.stdout
    assert not (tmp_path / ".venv").exists()
