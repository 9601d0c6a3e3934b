"""Scheduler selection, reachability probing and the LocalCluster fallback."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import dask.config
import pytest

from imgindex.cluster.connect import connect, probe_scheduler, resolve_target
from imgindex.pipeline.errors import SchedulerUnreachable


@pytest.fixture
def silent_listener():
    """Accepts connections and never answers: hangs a bare Client forever."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    conns = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(server.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"tcp://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    t.join()
    for c in conns:
        c.close()
    server.close()


@pytest.fixture
def one_local_worker():
    with dask.config.set({"imgindex.local.n-workers": 1}):
        yield


def test_precedence_flag_file_env_config(monkeypatch):
    monkeypatch.delenv("IMGINDEX_SCHEDULER", raising=False)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    assert resolve_target().source == ""
    with dask.config.set({"imgindex.scheduler": "tcp://cfg:1"}):
        assert resolve_target().address == "tcp://cfg:1"
        monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://dask-env:1")
        assert resolve_target().address == "tcp://dask-env:1"
        monkeypatch.setenv("IMGINDEX_SCHEDULER", "tcp://env:1")
        assert resolve_target().source == "env IMGINDEX_SCHEDULER"
        assert resolve_target(scheduler_file="s.json").source == "--scheduler-file"
        assert resolve_target("tcp://flag:1", "s.json").address == "tcp://flag:1"


def test_probe_gives_up_on_a_silent_listener_within_the_timeout(silent_listener):
    started = time.monotonic()
    result = probe_scheduler(silent_listener, 1.0)
    assert result == "timed out after 1 s"
    assert time.monotonic() - started < 15  # not the >25 s hang of a bare Client


def test_probe_reports_a_closed_port(refused_address):
    """As refused (a scheduler file left by a scheduler that has stopped),
    not as the time-out distributed reports after retrying it."""
    result = probe_scheduler(refused_address, 1.0)
    assert result.startswith("connection refused: nothing listens on that port")


def test_probe_identifies_a_real_scheduler(process_cluster):
    ident = probe_scheduler(process_cluster.scheduler_address, 3.0)
    assert ident["type"] == "Scheduler" and len(ident["workers"]) == 2


def test_remote_scheduler_is_used_and_described(process_cluster):
    with connect(process_cluster.scheduler_address, timeout=3) as conn:
        assert conn.kind == "remote"
        assert conn.reason == f"remote {process_cluster.scheduler_address}: 2 workers"
        assert conn.dashboard.startswith("http://")


def test_scheduler_file_is_read(process_cluster, tmp_path, monkeypatch):
    sf = tmp_path / "scheduler.json"
    sf.write_text(json.dumps({"address": process_cluster.scheduler_address}))
    with connect(scheduler_file=str(sf), timeout=3) as conn:
        assert conn.kind == "remote"
    # `scheduler-file: ~/scheduler.json` in a YAML file: under the home folder.
    monkeypatch.setenv("HOME", str(tmp_path))
    with dask.config.set({"imgindex.scheduler-file": "~/scheduler.json"}):
        with connect(timeout=3, fallback=False) as conn:
            assert conn.kind == "remote"


@pytest.mark.slow
def test_unreachable_scheduler_falls_back_and_says_why(
    one_local_worker, caplog, refused_address
):
    address = refused_address
    with caplog.at_level("WARNING", logger="cluster"):
        with connect(address, timeout=1) as conn:
            assert conn.kind == "local"
            assert conn.reason.startswith(f"local: {address}: ")
            assert conn.client.submit(sum, [1, 2]).result() == 3
    assert "falling back to a LocalCluster" in caplog.text


def test_no_fallback_makes_it_an_error(silent_listener):
    with pytest.raises(
        SchedulerUnreachable, match="timed out after 1 s.*--no-fallback"
    ):
        connect(silent_listener, timeout=1, fallback=False)


def test_missing_scheduler_file_is_an_error_without_fallback(tmp_path):
    with pytest.raises(SchedulerUnreachable, match="scheduler file .* missing"):
        connect(scheduler_file=str(tmp_path / "none.json"), fallback=False)


@pytest.mark.slow
def test_no_scheduler_configured_starts_a_local_cluster(one_local_worker, monkeypatch):
    monkeypatch.delenv("IMGINDEX_SCHEDULER", raising=False)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with connect() as conn:
        assert (conn.kind, conn.reason) == ("local", "local: no scheduler configured")
        assert len(conn.client.nthreads()) == 1


_PRELOADED = (
    "onnxruntime",
    "imgindex.pipeline.embed",
    "faiss",
    "imgindex.cluster.forkserver_exit",
)


def _imported_here(dask_worker) -> dict:
    import os
    import sys

    return {
        "parent": os.getppid(),
        "modules": {m for m in _PRELOADED if m in sys.modules},
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        # imgindex.local.dask-config reached the worker
        "profiled": "profile" in dask_worker.periodic_callbacks,
        "tick": dask_worker._tick_interval,
    }


@pytest.mark.slow
def test_local_workers_fork_from_a_server_that_imported_their_modules(
    one_local_worker, monkeypatch
):
    """forkserver (the default): each worker starts with ONNX Runtime and
    imgindex's worker modules imported once, in the server; spawn: from
    scratch. Either closes cleanly; another method is a one-line error."""
    import os

    from imgindex.pipeline.errors import ConfigError

    monkeypatch.delenv("IMGINDEX_SCHEDULER", raising=False)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    seen, seen_scheduler_ticks = {}, set()
    for method in ("forkserver", "spawn"):
        with dask.config.set({"imgindex.local.start-method": method}):
            with connect() as conn:
                (seen[method],) = conn.client.run(_imported_here).values()
                seen_scheduler_ticks.add(conn.cluster.scheduler._tick_interval)
    assert seen["forkserver"]["modules"] == set(_PRELOADED)
    assert seen["forkserver"]["parent"] != os.getpid()  # the server's child
    assert seen["spawn"]["modules"] == set()
    assert seen["spawn"]["parent"] == os.getpid()
    # The server started before any Nanny: it set what a Nanny sets first.
    assert seen["forkserver"]["blas_threads"] == seen["spawn"]["blas_threads"] == "1"
    # Dask's profiler off and its ticks eased (imgindex.local.dask-config), and
    # the scheduler's too; the client's own Dask config is as it was.
    for method in seen:
        assert seen[method]["profiled"] is False and seen[method]["tick"] == 0.1
    assert seen_scheduler_ticks == {0.1}
    assert dask.config.get("distributed.admin.tick.interval") != "100ms"
    with dask.config.set({"imgindex.local.start-method": "fork"}):
        with pytest.raises(ConfigError, match="start-method 'fork' is not one of"):
            connect()


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("n-workers", -1, "imgindex.local.n-workers -1 is not a whole number >= 1"),
        ("n-workers", "two", "n-workers 'two' is not a whole number >= 1"),
        ("threads-per-worker", 0, "threads-per-worker 0 is not a whole number"),
        ("memory-limit", "lots", "memory-limit 'lots' is not a memory size"),
        ("memory-limit", 8, "memory-limit 8 is not a memory size of at least 256"),
    ],
)
def test_a_local_cluster_size_it_would_hang_or_fail_on_is_one_line(
    monkeypatch, key, value, words
):
    """No workers (the build would wait for them forever), no threads, a
    memory limit LocalCluster cannot read or a number without its unit (8
    bytes: every worker paused): each refused by name before any starts."""
    from imgindex.pipeline.errors import ConfigError

    monkeypatch.delenv("IMGINDEX_SCHEDULER", raising=False)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with dask.config.set({f"imgindex.local.{key}": value}):
        with pytest.raises(ConfigError, match=words) as refused:
            connect()
    assert "\n" not in str(refused.value)


def test_doctor_does_not_advise_dropping_a_flag_nobody_passed(tmp_path):
    # Issue 8, item 25: doctor is strict by itself; --no-fallback is the user's.
    from tests.helpers import invoke

    result = invoke("doctor", "--scheduler", "tcp://127.0.0.1:1")
    assert result.exit_code == 1
    assert "--no-fallback" not in result.stderr
    assert "start `dask scheduler` and `dask worker`, or fix the address" in (
        result.stderr
    )
    result = invoke("doctor", "--scheduler", "tcp://127.0.0.1:1", "--no-fallback")
    assert "or drop --no-fallback" in result.stderr


def test_doctor_takes_builds_of_one_release_as_the_same_package():
    """A GPU worker's torch 2.13.0+cu128 beside the client's 2.13.0+cpu is the
    same release; another release is a warning, another distributed an error."""
    from imgindex.cluster.environment import problems

    client = {
        "imgindex": "0.3.0",
        "python": "3.11.7",
        "distributed": "2026.8.0",
        "torch": "2.13.0+cpu",
    }

    def worker(**versions):
        return {"executable": "/venv/bin/python", **client, **versions}

    assert problems(
        {"client": client, "tcp://gpu:1": worker(torch="2.13.0+cu128")}
    ) == (
        [],
        [],
    )
    errors, warnings = problems(
        {
            "client": client,
            "tcp://old:1": worker(torch="2.12.1+cu128"),
            "tcp://odd:1": worker(distributed="2026.9.0"),
        }
    )
    assert warnings == [
        "worker tcp://old:1 has torch 2.12.1+cu128, the client 2.13.0+cpu"
    ]
    assert errors == [
        "worker tcp://odd:1 has distributed 2026.9.0, the client 2026.8.0"
    ]


def test_doctor_names_a_worker_that_cannot_read_heic():
    """pillow-heif on the client but not on a worker: that worker's HEIC photos
    would be listed as failed, so doctor says so and how to mend it."""
    from imgindex.cluster.environment import problems

    client = {"imgindex": "0.3.0", "python": "3.11", "pillow-heif": "1.9.0"}
    errors, warnings = problems(
        {
            "client": client,
            "tcp://bare:1": {**client, "executable": "x", "pillow-heif": None},
            "tcp://more:1": {**client, "executable": "x", "torch": "2.13.0"},
        }
    )
    assert errors == []
    assert warnings == [
        "worker tcp://bare:1 lacks pillow-heif, which the client has (1.9.0): it "
        "lists HEIC/HEIF images as failed; pip install 'imgindex[heif]' there",
        "worker tcp://more:1 has torch 2.13.0, which the client lacks",
    ]


def _run_script(tmp_path: Path, source: str) -> str:
    """Run ``source`` in a fresh interpreter (no scheduler configured, this
    checkout importable); its stdout."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("IMGINDEX_SCHEDULER", None)
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env,
        timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


_DASHBOARD_PROBE = """
import json, sys, urllib.request
from imgindex.cluster.connect import start_local

def get(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.status, r.geturl(), r.read().decode(errors="replace")

if __name__ == "__main__":
    seen = {}
    with start_local("test") as conn:
        base = conn.dashboard.rsplit("/", 1)[0]
        seen["link"] = conn.dashboard
        seen["loaded_at_start"] = "distributed.dashboard.scheduler" in sys.modules
        seen["health"] = get(base + "/health")[::2]
        seen["loaded_after_health"] = "distributed.dashboard.scheduler" in sys.modules
        status, url, page = get(conn.dashboard)
        seen["status"] = [status, url, "bokeh" in page.lower(), "Dask" in page]
        status, url, page = get(base + "/")  # the dashboard's own redirect
        seen["root"] = [status, url]
        seen["loaded_at_end"] = "distributed.dashboard.scheduler" in sys.modules
    print(json.dumps(seen))
"""


@pytest.mark.slow
def test_local_dashboard_is_loaded_when_first_opened(tmp_path):
    """The LocalCluster starts without Bokeh's dashboard (0.35 s of the
    client's CPU before a build's first task): its link works all the same,
    loading the dashboard on the first request and answering it."""
    seen = json.loads(_run_script(tmp_path, _DASHBOARD_PROBE).splitlines()[-1])
    assert seen["link"].startswith("http://127.0.0.1:") and seen["link"].endswith(
        "/status"
    )
    assert seen["loaded_at_start"] is False
    assert seen["health"] == [200, "ok"]
    assert seen["loaded_after_health"] is False  # its own routes need no Bokeh
    assert seen["status"] == [200, seen["link"], True, True]
    assert seen["root"] == [200, seen["link"]]
    assert seen["loaded_at_end"] is True


_EARLY_SERVER = """
import multiprocessing.forkserver
from imgindex.cluster.connect import start_local_early

if __name__ == "__main__":
    start_local_early(None, None)
    print(multiprocessing.forkserver._forkserver._forkserver_pid, flush=True)
"""


def test_a_forkserver_started_early_is_stopped_as_the_client_exits(tmp_path):
    """A build that needs no cluster (or stops at a bad argument) does not
    leave the server importing, holding the client's stdout open."""
    pid = int(_run_script(tmp_path, _EARLY_SERVER).split()[0])
    # Its imports take half a second: had it been left alone, it would still
    # be running now (and capture_output would have waited for it).
    assert not Path(f"/proc/{pid}").exists()
