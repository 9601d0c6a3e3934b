"""Faults that happen to processes (issue 8): frozen workers, a lost scheduler, signals.

Every test here uses real `dask scheduler` / `dask worker` processes or a real
`imgindex` subprocess, because the faults are about processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask.config
import pytest

from imgindex.pipeline.synthetic import write_photos
from tests.conftest import copy_tree
from tests.helpers import (
    error_lines,
    imgindex_cmd,
    invoke,
    one_error_line,
    read_index,
    start_imgindex,
    wait_for_progress,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photos(
        tmp_path_factory.mktemp("proc") / "photos", 160, seed=5, max_side=320
    )[0].parent


@pytest.mark.parametrize("when", ["mid-build", "before the build"])
def test_frozen_worker_is_dropped_and_its_images_indexed_once(
    dask_processes, photos, tmp_path, when
):
    address = dask_processes.start_scheduler()
    dask_processes.start_worker("a")
    dask_processes.start_worker("b")
    dask_processes.wait_for_workers(2)
    frozen = dask_processes.worker_pids()["a"]
    progress = tmp_path / "progress.json"
    if when == "before the build":
        os.kill(frozen, signal.SIGSTOP)  # as `scontrol suspend` does
    build = start_imgindex(
        "build", photos, "--out", tmp_path / "out", "--json", "--scheduler", address,
        "--partition-size", "8", "--progress-file", progress, "--task-timeout", "8s",
        env={"DASK_IMGINDEX__WORKER_UNRESPONSIVE": "6s",
             "DASK_IMGINDEX__CALL_TIMEOUT": "5s"},
    )  # fmt: skip
    with resumed_at_exit(frozen, build):
        if when == "mid-build":
            wait_for_progress(progress, 8, build)
            os.kill(frozen, signal.SIGSTOP)
        out, err = build.communicate(timeout=240)
    assert build.returncode == 0, err
    if when == "before the build":  # the version survey named it, no hang
        assert "did not answer within 5 s" in err
    assert "unresponsive" in err
    assert_each_photo_indexed_once(out, tmp_path / "out" / "photos")


@contextlib.contextmanager
def resumed_at_exit(frozen: int, build):
    """Resume the suspended worker ``frozen``, and stop ``build``, however the
    block ends (a failed test must not leave either behind)."""
    try:
        yield
    finally:
        os.kill(frozen, signal.SIGCONT)
        if build.poll() is None:
            build.kill()
            build.communicate()


def assert_each_photo_indexed_once(out: str, index_dir: Path) -> None:
    (summary,) = json.loads(out)["datasets"]
    assert summary["indexed"] == 160 and summary["failed"] == []
    stored = read_index(index_dir)
    assert len({r.path for r in stored.manifest}) == stored.index.ntotal == 160


# Worker "a" suspends itself while it hands over a finished result with no
# other task on it: the last partition it ran. Dask's scheduler keeps such a
# worker (it stays connected) until worker-ttl, 5 minutes.
FREEZE_WHEN_FETCHED = """
import os, signal
from distributed.worker import Worker

serve = Worker.get_data


async def get_data(self, comm, keys, who=None, serializers=None):
    idle = not (self.state.executing or self.state.ready or self.state.constrained)
    if idle and not os.environ.get("FROZE"):
        os.environ["FROZE"] = "1"
        os.kill(os.getpid(), signal.SIGSTOP)
    return await serve(self, comm, keys, who, serializers)


Worker.get_data = get_data
"""


def test_worker_frozen_holding_only_finished_results_is_dropped(
    dask_processes, photos, tmp_path
):
    address = dask_processes.start_scheduler()
    dask_processes.start_worker("a", prelude=FREEZE_WHEN_FETCHED)
    dask_processes.start_worker("b")
    workers = dask_processes.wait_for_workers(2)
    frozen = dask_processes.worker_pids()["a"]
    build = start_imgindex(
        "build", photos, "--out", tmp_path / "out", "--json", "--scheduler", address,
        "--partition-size", "8",
        env={"DASK_IMGINDEX__WORKER_UNRESPONSIVE": "6s"},
    )  # fmt: skip
    with resumed_at_exit(frozen, build):
        out, err = build.communicate(timeout=150)
    assert build.returncode == 0, err
    assert f"worker {workers['a']} has been unresponsive" in err
    assert_each_photo_indexed_once(out, tmp_path / "out" / "photos")


def test_doctor_names_a_frozen_worker_instead_of_hanging(dask_processes):
    address = dask_processes.start_scheduler()
    dask_processes.start_worker("awake")
    dask_processes.start_worker("asleep")
    workers = dask_processes.wait_for_workers(2)
    frozen = dask_processes.worker_pids()["asleep"]
    os.kill(frozen, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with dask.config.set({"imgindex.call-timeout": "5s"}):
            result = invoke("doctor", "--scheduler", address, "--json")
        took = time.monotonic() - started
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert result.exit_code == 1
    assert took < 90
    report = json.loads(result.stdout)
    rows = {w["address"]: w for w in report["workers"]}
    assert rows[workers["awake"]]["ok"]
    assert not rows[workers["asleep"]]["ok"]
    assert "did not answer within 5 s" in rows[workers["asleep"]]["error"]


def test_lost_scheduler_is_one_line_that_says_rerun_resumes(
    dask_processes, photos, tmp_path
):
    address = dask_processes.start_cluster("w")
    progress = tmp_path / "progress.json"
    build = start_imgindex(
        "build", photos, "--out", tmp_path / "out", "--scheduler", address,
        "--partition-size", "8", "--progress-file", progress,
        env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s"},
    )  # fmt: skip
    wait_for_progress(progress, 8, build)
    dask_processes.procs[0].kill()  # the scheduler
    _, err = build.communicate(timeout=180)
    assert build.returncode == 1
    line = one_error_line(err)
    assert "scheduler" in line and "run the same command again to resume" in line
    assert json.loads(progress.read_text())["state"] == "failed"


def test_a_build_left_with_no_worker_waits_for_one_then_stops_in_one_line(
    dask_processes, photos, tmp_path
):
    """Every worker gone (batch jobs past their walltime): the build says so
    and waits; one that joins gets the work; left alone past
    imgindex.no-workers-timeout, the build stops and a re-run resumes."""
    address = dask_processes.start_scheduler()
    first = dask_processes.start_worker("first")
    dask_processes.wait_for_workers(1)
    progress = tmp_path / "progress.json"
    args = ["build", photos, "--out", tmp_path / "out", "--scheduler", address,
            "--partition-size", "8", "--progress-file", progress]  # fmt: skip
    build = start_imgindex(*args, env={"DASK_IMGINDEX__NO_WORKERS_TIMEOUT": "30s"})
    try:
        wait_for_progress(progress, 16, build)
        first.terminate()
        first.wait(30)
        time.sleep(12)  # past the 10 s after which the build says so
        done = json.loads(progress.read_text())["datasets"][0]["done"]
        second = dask_processes.start_worker("second")
        wait_for_progress(progress, done + 8, build)
        second.terminate()
        second.wait(30)
        _, err = build.communicate(timeout=120)
    finally:
        if build.poll() is None:
            build.kill()
            build.communicate()
    assert build.returncode == 1, err
    assert err.count("no worker is left on the cluster") == 2, err
    assert "waiting up to 30 s for one to join" in err
    assert err.count("a worker joined the cluster; going on") == 1, err
    line = one_error_line(err)
    assert line.startswith("Error: no worker has been on the cluster for 30 s"), line
    assert "while embedding photos" in line and "run the same command again" in line
    state = json.loads(progress.read_text())
    assert state["state"] == "failed" and 16 <= state["datasets"][0]["done"] < 160
    dask_processes.start_worker("third")
    dask_processes.wait_for_workers(1)
    again = subprocess.run(
        imgindex_cmd(*args[:-2], "--json"), capture_output=True, text=True, timeout=240
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["datasets"][0]["resumed_images"] >= 24
    assert_each_photo_indexed_once(again.stdout, tmp_path / "out" / "photos")


def _search_hit_by(
    address: str, photos: Path, tmp_path: Path, env: dict, fault
) -> tuple[subprocess.Popen, list[dict], str]:
    """Index ``photos`` on the cluster, search them all with ``--jsonl`` and
    call ``fault()`` once the first answer is out: the search, its answers
    and its stderr."""
    out = tmp_path / "out"
    built = invoke("build", photos, "--out", out, "--scheduler", address)
    assert built.exit_code == 0, built.stderr
    with start_imgindex(
        "search", out / photos.name, photos, "--jsonl", "--scheduler", address,
        env=env,
    ) as search:  # fmt: skip
        first = search.stdout.readline()
        fault()
        # Read through the pipes' buffers (communicate would skip what
        # readline buffered); stderr is a few lines.
        rest, err = search.stdout.read(), search.stderr.read()
    return search, [json.loads(x) for x in (first + rest).splitlines()], err


def test_lost_scheduler_mid_search_is_one_line_after_the_answers_so_far(
    dask_processes, photos, tmp_path
):
    address = dask_processes.start_cluster("w")
    search, answered, err = _search_hit_by(
        address, photos, tmp_path, {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s"},
        dask_processes.procs[0].kill,  # the scheduler
    )  # fmt: skip
    assert search.returncode == 1, err
    line = one_error_line(err)
    assert line.startswith(f"Error: lost the scheduler {address} while searching")
    # Not told that the lost tasks were sent again: they cannot be.
    assert "sent again" not in err, err
    assert 0 < len(answered) < 160
    assert answered[0]["query"] == str(sorted(photos.iterdir())[0])
    assert answered[0]["hits"][0]["path"].endswith(answered[0]["query"])


def test_a_service_outlives_its_lost_scheduler_and_builds_on_its_return(
    dask_processes, photos, tmp_path
):
    from tests.helpers import RunningService

    address = dask_processes.start_cluster("w")
    datasets = tmp_path / "datasets"
    copy_tree(sorted(photos.iterdir()), datasets / "photos")
    service = RunningService(
        tmp_path / "indexes", datasets, "t0ken", "--scheduler", address,
        env={"DASK_IMGINDEX__PARTITION_SIZE": "8",
             "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s"},
    )  # fmt: skip
    try:
        first = service.build("photos")
        service.wait(first["id"], until=lambda s: s["datasets"][0]["done"] >= 16)
        dask_processes.procs[0].kill()  # the scheduler
        lost = service.wait(first["id"], timeout=120)
        assert lost["state"] == "failed", lost
        assert service.process.poll() is None
        assert service.request("GET", "/health").status_code == 200
        # One line, for the API's clients: no traceback, no address.
        (dataset,) = lost["datasets"]
        error = dataset["error"]
        assert error.startswith("lost the scheduler <address withheld> while"), error
        assert "start the same build again to resume" in error, error
        assert "command" not in error and lost["summaries"][0]["error"] == error
        assert "\n" not in error and "Traceback" not in "".join(service.log)
        # The cluster comes back where it was: the next build uses it, and
        # resumes from the partitions the first one saved.
        dask_processes.scheduler_file.unlink()  # left by the killed scheduler
        dask_processes.start_scheduler("--port", address.rsplit(":", 1)[1])
        dask_processes.start_worker("w2")
        dask_processes.wait_for_workers(1)
        again = service.wait(service.build("photos")["id"])
        assert again["state"] == "finished", again
        (summary,) = again["summaries"]
        assert summary["indexed"] == 160 and summary["failed"] == []
        assert 0 < summary["resumed_images"] < 160, summary
        stored = read_index(tmp_path / "indexes" / "photos")
        assert len({r.path for r in stored.manifest}) == stored.index.ntotal == 160
    finally:
        service.stop()


def test_a_service_that_fell_back_returns_to_its_scheduler_once_it_is_up(
    dask_processes, photos, tmp_path
):
    """A LocalCluster fallen back to while the scheduler was down serves the
    builds of that outage only, not the rest of the service's life."""
    import socket

    import psutil

    from tests.helpers import RunningService

    def alive(procs: list) -> list:
        return [
            p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        ]

    with socket.socket() as s:  # a port nothing listens on (yet)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    datasets = tmp_path / "datasets"
    copy_tree(sorted(photos.iterdir())[:12], datasets / "photos")
    service = RunningService(
        tmp_path / "indexes", datasets, "t0ken", "--scheduler", f"tcp://127.0.0.1:{port}",
    )  # fmt: skip

    def build_one_more(n: int) -> dict:
        (datasets / "photos" / f"new{n}.jpg").write_bytes(
            (photos / f"img{100 + n:05d}.jpg").read_bytes()
        )
        done = service.wait(service.build("photos")["id"])
        assert done["state"] == "finished", done
        assert done["summaries"][0]["added"] == 1, done
        return done["cluster"]

    try:
        down = service.wait(service.build("photos")["id"])
        assert down["state"] == "finished", down
        assert down["cluster"]["kind"] == "local"
        assert "connection refused" in down["cluster"]["reason"]
        local = alive(psutil.Process(service.process.pid).children(recursive=True))
        assert len(local) >= 2  # its two workers, and what started them
        # Still down: the next build stays on the LocalCluster it has.
        assert build_one_more(1)["kind"] == "local"
        assert "".join(service.log).count("falling back to a LocalCluster") == 1
        dask_processes.start_scheduler("--port", str(port))
        dask_processes.start_worker("w")
        dask_processes.wait_for_workers(1)
        up = build_one_more(2)
        assert up["kind"] == "remote" and up["workers"] == 1, up
        assert "can be used again" in "".join(service.log)
        status = service.request("GET", "/api/status").json()
        assert status["cluster"]["kind"] == "remote"
        # The LocalCluster, no longer used, was closed: its workers are gone.
        deadline = time.monotonic() + 30
        while len(alive(local)) > len(local) - 2:
            assert time.monotonic() < deadline, f"still running: {alive(local)}"
            time.sleep(0.2)
    finally:
        service.stop()


def test_a_search_left_with_no_worker_stops_in_one_line_after_its_answers(
    dask_processes, photos, tmp_path
):
    address = dask_processes.start_scheduler()
    only = dask_processes.start_worker("only")
    dask_processes.wait_for_workers(1)
    search, answered, err = _search_hit_by(
        address, photos, tmp_path, {"DASK_IMGINDEX__NO_WORKERS_TIMEOUT": "12s"},
        only.terminate,
    )  # fmt: skip
    assert search.returncode == 1, err
    assert "no worker is left on the cluster" in err
    line = one_error_line(err)
    assert line.startswith(
        "Error: no worker has been on the cluster for 12 s "
        f"(imgindex.no-workers-timeout) while searching ({photos.name})"
    ), line
    assert 0 < len(answered) < 160


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_interrupted_build_says_so_in_one_line_and_resumes(
    process_cluster, photos, tmp_path, signame
):
    progress = tmp_path / "progress.json"
    args = ["build", photos, "--out", tmp_path / "out", "--partition-size", "8"]
    build = start_imgindex(*args, "--progress-file", progress)
    wait_for_progress(progress, 16, build)
    # Ctrl-C reaches the whole process group, LocalCluster workers included.
    os.killpg(build.pid, getattr(signal, signame))
    _, err = build.communicate(timeout=120)
    assert build.returncode == (130 if signame == "SIGINT" else 143)
    line = one_error_line(err)
    assert line.startswith(f"Error: interrupted by {signame}")
    assert "run the same command again to resume" in line
    # Not a traceback or a KeyboardInterrupt from each worker (they were ~35
    # lines each): the workers leave the signal to the client.
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert len(error_lines(err)) == 1
    state = json.loads(progress.read_text())
    assert state["state"] == "interrupted"
    assert invoke("status", progress).stdout.startswith("build interrupted")
    # the same command, on the session's cluster to save a start-up
    result = invoke(*args, "--json", "--scheduler", process_cluster.scheduler_address)
    assert result.exit_code == 0, result.stderr
    (summary,) = json.loads(result.stdout)["datasets"]
    assert summary["resumed_images"] >= 16
    assert summary["indexed"] == 160


_SIGNAL_IN_A_FINALIZER = """
import os, signal, sys, time
from imgindex.cli.group import sigterm_as_interrupt

class Finalized:
    def __del__(self):
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        time.sleep(0.5)  # the signal's exception is raised in here

@sigterm_as_interrupt
def command(then):
    Finalized()  # collected at once: its __del__ runs here
    if then == "works on":
        for _ in range(200):
            time.sleep(0.05)
    return "ran to the end"

try:
    print(command(sys.argv[2]))
except KeyboardInterrupt as e:
    print("interrupted by", e)
"""


@pytest.mark.parametrize("then", ["works on", "returns"])
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_swallowed_by_a_finalizer_still_interrupts(signame, then):
    """Raised inside a ``__del__`` (distributed's Future has one), a signal's
    KeyboardInterrupt is only printed as "Exception ignored": a scancel'd build
    once ran to its end and exited 0. It is raised again after the finalizer,
    or when the command returns, whichever comes first."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", _SIGNAL_IN_A_FINALIZER, signame, then],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.stdout == f"interrupted by {signame}\n", result.stderr
    assert time.monotonic() - started < 8  # not after the 10 s of work
    assert "Exception ignored" not in result.stderr, result.stderr


def test_lost_scheduler_mid_duplicates_is_one_error_not_a_traceback(
    dask_processes, photos, tmp_path
):
    """Dask cancels every future when its client loses the scheduler: a
    BaseException, which the command line would have shown as a traceback."""
    import imgindex
    from imgindex.pipeline.duplicates import find_duplicates
    from imgindex.pipeline.errors import ImgindexError

    address = dask_processes.start_cluster("w")
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "3s"}),
        dask_processes.client() as c,
    ):
        imgindex.build(photos, tmp_path / "out", client=c, progress=False)

        def kill_scheduler(stage: str, done: int, total: int) -> None:
            if stage == "neighbours" and done == 0:
                dask_processes.procs[0].kill()

        with pytest.raises(ImgindexError) as caught:
            find_duplicates(
                tmp_path / "out" / photos.name, client=c, on_step=kill_scheduler
            )
    assert str(caught.value).startswith(
        f"lost the scheduler {address} while looking for duplicates (photos); "
    )


def test_worker_frozen_mid_duplicates_is_dropped_and_changes_nothing(
    dask_processes, photos, tmp_path, caplog
):
    """The duplicate search's tasks, like a build's, are watched: a worker
    frozen while it holds them is dropped after imgindex.worker-unresponsive,
    not waited on for Dask's 5 minutes, and the report is the one made here."""
    from dataclasses import replace

    import imgindex
    from imgindex.pipeline.duplicates import DuplicateSettings, find_duplicates

    folder = tmp_path / "photos"
    copy_tree(sorted(photos.iterdir())[:48], folder)
    for n in range(0, 48, 6):  # byte-for-byte copies, each its own group
        shutil.copy(folder / f"img{n:05d}.jpg", folder / f"copy{n:05d}.jpg")
    out = tmp_path / "out"
    dask_processes.start_scheduler()
    dask_processes.start_worker("a", extra=("--no-nanny",))
    dask_processes.start_worker("b")
    addresses = dask_processes.wait_for_workers(2)
    frozen = dask_processes.worker_pids()["a"]
    with dask_processes.client() as c:
        imgindex.build(folder, out, client=c, partition_size=4, progress=False)
    # A task for each shard's rows, so that worker a holds some of them.
    settings = replace(DuplicateSettings.from_config(), rows_per_task=4)
    here = find_duplicates(out / "photos", settings)
    assert len(here.groups) == 8

    signalled: list[float] = []

    def freeze_a(stage: str, done: int, total: int) -> None:
        if done and not signalled:
            os.kill(frozen, signal.SIGSTOP)
            signalled.append(time.monotonic())

    try:
        with (
            dask.config.set({"imgindex.worker-unresponsive": "3s"}),
            dask_processes.client() as c,
        ):
            there = find_duplicates(out / "photos", settings, c, on_step=freeze_a)
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert signalled
    assert time.monotonic() - signalled[0] < 60  # not Dask's 5 minutes
    assert f"worker {addresses['a']} has been unresponsive" in caplog.text
    timings = {"seconds", "stage_seconds"}
    assert {k: v for k, v in there.totals().items() if k not in timings} == {
        k: v for k, v in here.totals().items() if k not in timings
    }
    assert [g.to_json() for g in there.groups] == [g.to_json() for g in here.groups]


def test_duplicates_left_with_no_worker_stop_in_one_line(
    dask_processes, photos, tmp_path, caplog
):
    """The index's, the search's and the duplicate search's tasks are
    watched as a build's are: a cluster left with no worker is given up on
    after imgindex.no-workers-timeout, in one line, not waited on for ever."""
    from dataclasses import replace

    import imgindex
    from imgindex.pipeline.duplicates import DuplicateSettings, find_duplicates
    from imgindex.pipeline.errors import ImgindexError

    folder = copy_tree(sorted(photos.iterdir())[:24], tmp_path / "photos")
    out = tmp_path / "out"
    dask_processes.start_scheduler()
    only = dask_processes.start_worker("only")
    dask_processes.wait_for_workers(1)
    with dask_processes.client() as c:
        imgindex.build(folder, out, client=c, partition_size=4, progress=False)
    settings = replace(DuplicateSettings.from_config(), rows_per_task=4)

    def stop_the_worker(stage: str, done: int, total: int) -> None:
        if done and only.poll() is None:
            only.terminate()
            only.wait(30)

    with (
        dask.config.set({"imgindex.no-workers-timeout": "12s"}),
        dask_processes.client() as c,
        pytest.raises(ImgindexError) as raised,
    ):
        find_duplicates(out / "photos", settings, c, on_step=stop_the_worker)
    assert only.poll() is not None
    assert str(raised.value).startswith(
        "no worker has been on the cluster for 12 s (imgindex.no-workers-timeout) "
        "while looking for duplicates (photos); once workers are back"
    ), raised.value
    assert "no worker is left on the cluster" in caplog.text


def test_status_notices_a_build_that_was_killed(process_cluster, photos, tmp_path):
    progress = tmp_path / "progress.json"
    build = start_imgindex(
        "build", photos, "--out", tmp_path / "out", "--partition-size", "8",
        "--progress-file", progress, "--scheduler", process_cluster.scheduler_address,
    )  # fmt: skip
    wait_for_progress(progress, 8, build)
    os.kill(build.pid, signal.SIGKILL)
    build.communicate()  # reaped, its pipes closed
    result = invoke("status", progress)
    assert result.exit_code == 0
    assert result.stdout.startswith("build running? probably dead: its process")
    data = json.loads(invoke("status", progress, "--json").stdout)
    assert data["stale"] == f"its process {build.pid} is gone"
    assert not error_lines(result.stderr)


def _make_certificate(folder: Path) -> dict[str, str]:
    """A self-signed certificate made here (nothing downloaded), for every party."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=imgindex-test", "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return {"ca": str(cert), "cert": str(cert), "key": str(key)}


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl command")
def test_tls_cluster_is_used_not_fallen_back_from(dask_processes, photos, tmp_path):
    tls = _make_certificate(tmp_path)
    tls_args = ["--tls-ca-file", tls["ca"], "--tls-cert", tls["cert"],
                "--tls-key", tls["key"]]  # fmt: skip
    address = dask_processes.start_scheduler("--protocol", "tls", *tls_args)
    assert address.startswith("tls://")
    dask_processes.start_worker("worker", extra=tuple(tls_args))
    env = {
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": tls["ca"],
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": tls["cert"],
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": tls["key"],
        "DASK_IMGINDEX__WORKER_WAIT": "60s",
    }
    doctor = subprocess.run(
        imgindex_cmd("doctor", "--scheduler", address, "--json"),
        capture_output=True, text=True, env={**os.environ, **env}, timeout=240,
    )  # fmt: skip
    assert doctor.returncode == 0, doctor.stderr
    assert json.loads(doctor.stdout)["cluster"]["kind"] == "remote"
    few = copy_tree(sorted(photos.iterdir())[:12], tmp_path / "few")
    build = subprocess.run(
        imgindex_cmd("build", few, "--out", tmp_path / "out", "--json",
                     "--scheduler", address, "--no-fallback"),
        capture_output=True, text=True, env={**os.environ, **env}, timeout=240,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    report = json.loads(build.stdout)
    assert report["cluster"]["address"] == address
    assert report["datasets"][0]["indexed"] == 12
    # without the certificate: one line that says what to set, no fallback
    result = invoke("build", few, "--out", tmp_path / "o2", "--scheduler", address,
                    "--no-fallback")  # fmt: skip
    assert result.exit_code == 1
    assert "distributed.comm.tls.ca-file" in one_error_line(result.stderr)
