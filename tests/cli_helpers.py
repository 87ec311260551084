"""Running `refbank` as a user runs it: the installed console script in a subprocess, or the same app under a
storage retry policy short enough for tests; and checks of what a failure prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REFBANK = str(Path(sys.executable).with_name("refbank"))
TINY = ["--encoder", "tiny-clip", "--weights", "untrained", "--batch-size", "4", "--min-area", "32"]

# The app as the console script runs it, with 3 quick storage tries instead of ~9 s of backoff.
_FAST_RETRIES = (
    "import sys; from bank_builder.format import retries; "
    "retries.RETRY = retries.RetryPolicy(attempts=3, first_backoff_s=0.01, max_backoff_s=0.02); "
    "from jobs.cli import app; sys.argv[0] = 'refbank'; app()"
)


def refbank(*args: str, timeout: float = 240, env: dict[str, str] | None = None,
            fast_retries: bool = False) -> subprocess.CompletedProcess:
    """Run `refbank ARGS` to completion (stdin closed, output captured as text)."""
    command = [sys.executable, "-c", _FAST_RETRIES] if fast_retries else [REFBANK]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)


def assert_one_line(run: subprocess.CompletedProcess, status: int, *phrases: str) -> str:
    """A failure as the CLI must report it: the exit status, one `error:` line on stderr holding every phrase,
    nothing on stdout, no traceback. Returns the line."""
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == status, (run.returncode, run.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-3000:]
    assert run.stdout == "" and "Traceback" not in run.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def assert_json_error(run: subprocess.CompletedProcess, status: int, kind: str) -> dict:
    """The --json form of a failure: one error object on stdout, the same status, nothing on stderr."""
    assert run.returncode == status, (run.returncode, run.stdout, run.stderr[-3000:])
    error = json.loads(run.stdout)
    assert error == {"error": kind, "detail": error["detail"], "exit_code": status} and error["detail"]
    assert run.stderr.strip() == "", run.stderr[-3000:]
    return error
