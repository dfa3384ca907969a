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


def _chosen(env: dict[str, str]) -> str:
    """The PYTHON the Makefile settles on (its database, printed without running a recipe)."""
    result = subprocess.run(
        ["make", "--no-print-directory", "-p", "-n", "-q", "setup"],
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
    """The system's python3 (the default PATH's), if it is 3.11 or newer and can make a venv."""
    found = subprocess.run(["sh", "-c", "command -p -v python3"], capture_output=True, text=True).stdout.strip()
    if not found:
        return None
    usable = subprocess.run(
        [found, "-c", "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))"], capture_output=True
    )
    return found if usable.returncode == 0 else None


def test_the_systems_python3_comes_before_one_on_path(tmp_path: Path) -> None:
    system = _system_python()
    if system is None:
        pytest.skip("the system's python3 cannot make a 3.11+ venv here")
    shadow = tmp_path / "python3"  # a python3 found first on PATH, as pyenv's shim is
    shadow.write_text("#!/bin/sh\nexit 1\n")
    shadow.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHON", None)
    assert _chosen(env) == system


def test_python_on_the_command_line_or_in_the_environment_wins() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    assert _chosen({**env, "PYTHON": "python3.99"}) == "python3.99"
    result = subprocess.run(
        ["make", "--no-print-directory", "-p", "-n", "-q", "setup", "PYTHON=python3.98"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert re.search(r"^PYTHON = python3\.98$", result.stdout, re.MULTILINE), result.stdout[-2000:]
