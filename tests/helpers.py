"""Running imgindex as users do: CliRunner in-process, or a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from pipeline.cli import cli


def invoke(*args, env: dict | None = None):
    """``imgindex ARGS`` in this process; stdout and stderr kept apart."""
    return CliRunner(env=env).invoke(
        cli, [str(a) for a in args], catch_exceptions=False
    )


def imgindex_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *map(str, args)]


def start_imgindex(*args, env: dict | None = None) -> subprocess.Popen:
    """``imgindex ARGS`` as its own process group, as a shell runs a job."""
    return subprocess.Popen(
        imgindex_cmd(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def error_lines(stderr: str) -> list[str]:
    """The ``Error:`` lines; asserts that no traceback was printed."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("Error: ")]


def one_error_line(stderr: str) -> str:
    """The one error line, which is the last line on stderr."""
    lines = stderr.strip().splitlines()
    errors = error_lines(stderr)
    assert errors == lines[-1:], stderr
    return errors[0]


def wait_for_progress(
    path: Path, done: int = 1, proc: subprocess.Popen | None = None, timeout=120
) -> dict:
    """Wait until the progress file counts ``done`` images of its first dataset."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited {proc.returncode} early:\n{out}\n{err}")
        try:
            state = json.loads(path.read_text())
            if state["datasets"][0]["done"] >= done:
                return state
        except (OSError, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"no progress in {path} after {timeout} s")


def can_mount_privately() -> bool:
    """Whether this process may mount a tmpfs in a mount namespace of its own
    (root, with unshare): the tests that need a full disk or a worker with its
    own view of --out use one."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0
