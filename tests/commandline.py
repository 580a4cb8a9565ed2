"""The command line as a user meets it: ``python -m metaqnn ...`` in a subprocess, and its one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env=None, timeout: float = 900) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [sys.executable, "-m", "metaqnn", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def one_line_error(result: "subprocess.CompletedProcess[str]", fragment: str) -> str:
    """Exit status 2, exactly one ``error:`` line holding ``fragment``, and no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]
