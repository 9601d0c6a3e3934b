"""Running imgindex as users do: CliRunner in-process, or a real subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from imgindex.cli import cli
from imgindex.pipeline.store import StoredIndex, read_index_dir


def invoke(*args, env: dict | None = None, stdin: bytes | None = None):
    """``imgindex ARGS`` in this process; stdout and stderr kept apart."""
    return CliRunner(env=env).invoke(
        cli, [str(a) for a in args], input=stdin, catch_exceptions=False
    )


def read_index(path: str | Path) -> StoredIndex:
    """An index directory read whole, FAISS index too, and its files closed
    (a test that drops a StoredIndex unread would leave them open)."""
    with read_index_dir(path) as stored:
        stored.index  # noqa: B018 (reading it checks it against the manifest)
    return stored


def imgindex_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "imgindex", *map(str, args)]


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


def listening_ports(pid: int) -> list[int]:
    """TCP ports that process ``pid`` and its descendants listen on."""
    import psutil

    root = psutil.Process(pid)
    ports = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:  # ended meanwhile
            continue
        ports.update(c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN)
    return sorted(ports)


# CI sets it: there a test that cannot run here (a browser, a package of the
# test or fast extras, root) fails instead of skipping (tests/conftest.py).
REQUIRE_ALL = "IMGINDEX_REQUIRE_ALL"


def import_or_skip(module: str):
    """``pytest.importorskip``, but a failure where CI requires all."""
    import importlib

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get(REQUIRE_ALL):
            raise ImportError(f"{e} ({REQUIRE_ALL} is set)") from e
        pytest.skip(f"needs {module}", allow_module_level=True)


def second_user_or_skip() -> None:
    """Tests that act as another Unix user need root to become one."""
    import pytest

    if os.getuid() != 0:
        pytest.skip("needs root, to act as a second Unix user (nobody)")


class Intruder:
    """tests/intruder.py as user nobody: started early, probed once."""

    def __init__(self, control: str):
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("intruder.py")), control],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def probe(self, **probes) -> dict:
        out, err = self.process.communicate(json.dumps(probes) + "\n", timeout=120)
        assert self.process.returncode == 0, err
        return json.loads(out)


class RunningService:
    """A real `imgindex serve` process on 127.0.0.1 and a free port (or a
    Unix socket), with a token from a file unless ``token`` is None."""

    def __init__(
        self,
        index_root: Path,
        dataset_root: Path | None,
        token: str | None = None,
        *args: str | Path,
        env: dict | None = None,
    ):
        import threading

        self.index_root = index_root
        self.dataset_root = dataset_root
        if dataset_root is None:  # no build could make it: it must be there
            index_root.mkdir(parents=True, exist_ok=True)
        flags: list[str | Path] = ["--index-root", index_root]
        if dataset_root is not None:
            flags += ["--dataset-root", dataset_root]
        if token is not None:
            token_file = index_root.parent / "token"
            token_file.write_text(token + "\n")
            flags += ["--token-file", token_file]
        if "--unix-socket" not in args:
            flags += ["--port", "0"]
        self.log: list[str] = []
        self.process = start_imgindex(
            "serve",
            *flags,
            *args,
            # A small cluster: two one-thread workers, as on these 2-core machines.
            env={"DASK_IMGINDEX__LOCAL__N_WORKERS": "2", **(env or {})},
        )
        line = self._wait_for_url()
        # http://127.0.0.1:PORT/?token=T, or unix:PATH (then no URL to use)
        self.printed = line.split()[2]
        self.login_url = self.printed
        self.url = self.printed.split("/?")[0].rstrip("/")
        self.token = token
        given = re.search(r"\?token=(\S+)", line)
        if given:
            from urllib.parse import unquote

            self.token = unquote(given[1])
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _wait_for_url(self, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        assert self.process.stderr is not None
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                self.process.wait(5)
                raise AssertionError(
                    f"imgindex serve exited {self.process.returncode}:\n"
                    + "".join(self.log)
                )
            self.log.append(line)
            if line.startswith("imgindex serve: "):
                return line
        raise AssertionError("imgindex serve did not start:\n" + "".join(self.log))

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, auth: bool = True, **kwargs):
        """An HTTP request with the token (``auth=False``: without it)."""
        import requests

        kwargs.setdefault("timeout", 120)
        if auth:
            kwargs["headers"] = {**self.auth(), **kwargs.get("headers", {})}
        return requests.request(method, self.url + path, **kwargs)

    def build(self, *datasets: str, rebuild: bool = False, moved: bool = False) -> dict:
        r = self.request(
            "POST",
            "/api/builds",
            json={"datasets": list(datasets), "rebuild": rebuild, "moved": moved},
        )
        assert r.status_code == 202, r.text
        return r.json()

    def wait(self, build_id: str, timeout: float = 180, until=None) -> dict:
        """The build's JSON once it is over (or once ``until(state)`` holds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.request("GET", f"/api/builds/{build_id}").json()
            if until(state) if until else state["state"] not in ("starting", "running"):
                return state
            time.sleep(0.1)
        raise AssertionError(f"build {build_id} still {state['state']}: {state}")

    def stop(self) -> int:
        import signal

        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        finally:
            self._drainer.join(10)  # the rest of its log, to EOF
            for pipe in (self.process.stdout, self.process.stderr):
                if pipe is not None:
                    pipe.close()


def copies_truth(query: str, hit: str, families: dict[str, str]) -> str:
    """What each hit is to each query of the copies_archive fixture."""
    if query == "tissue-a.jpg":
        return {"tissue.view-a.jpg": "identical", "tissue.view-b.jpg": "shot"}.get(
            hit, "undecided" if hit == "flat.jpg" else "neither"
        )
    if query == "stereo-right.jpg" and hit == "stereo-left.jpg":
        return "shot"
    if query == "chelsea-crop.jpg" and families[hit] == "chelsea":
        return "copy"
    return "undecided" if hit == "flat.jpg" else "neither"
