"""On a shared node: what imgindex starts is usable by the user who started it
and by nobody else. A LocalCluster's every port (scheduler, nannies, workers)
refuses a Dask client without its in-memory credentials, and another Unix
user (tests/intruder.py, as nobody) is refused by the cluster of a running
`imgindex build`, by the service and its cluster, and by its Unix socket.

The positive control: the same intruder reaches an open (unsecured) cluster,
so a refusal is the credentials' doing, not a probe that cannot connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import dask.config
import pytest

from imgindex.cluster.connect import start_local
from imgindex.pipeline.synthetic import write_photos
from tests.helpers import (
    Intruder,
    RunningService,
    listening_ports,
    second_user_or_skip,
    start_imgindex,
    wait_for_progress,
)
from tests.intruder import probe_dask

pytestmark = pytest.mark.slow


def _refused_everywhere(results: dict[str, list[str]]) -> None:
    for place, outcomes in results.items():
        for outcome in outcomes:
            assert outcome.startswith("refused"), (place, outcomes)


def test_a_local_cluster_refuses_every_client_but_ours(process_cluster):
    with dask.config.set({"imgindex.local.n-workers": 1}):
        conn = start_local("local: test")
    try:
        assert conn.address.startswith("tls://127.0.0.1:")
        assert conn.client.submit(sum, [1, 2]).result() == 3
        workers = conn.client.scheduler_info(n_workers=-1)["workers"]
        places = {conn.address} | set(workers)
        places |= {w["nanny"] for w in workers.values()}
        places = {a.removeprefix("tls://") for a in places}
        assert len(places) == 3  # the scheduler, the worker and its nanny
        control = process_cluster.scheduler_address.removeprefix("tcp://")
        results = asyncio.run(probe_dask([*places, control]))
        assert results.pop(control)[0].startswith("answered")
        _refused_everywhere(results)
    finally:
        conn.close()


def test_another_user_cannot_use_a_running_builds_cluster(process_cluster, tmp_path):
    second_user_or_skip()
    intruder = Intruder(process_cluster.scheduler_address)
    folder = tmp_path / "photos"
    # The probes take seconds (a refused TLS connect is retried until its
    # timeout), so the build must outlast them: 400 photos, each hard-linked
    # into four folders, embed for about 13 s on two workers here.
    for photo in write_photos(folder / "a", 400, seed=81, max_side=400):
        for copy in "bcd":
            (folder / copy).mkdir(exist_ok=True)
            (folder / copy / photo.name).hardlink_to(photo)
    progress = tmp_path / "progress.json"
    build = start_imgindex(
        "build", folder, "--out", tmp_path / "out", "--progress-file", progress,
        env={"DASK_IMGINDEX__LOCAL__N_WORKERS": "2"},
    )  # fmt: skip
    wait_for_progress(progress, 1, build)
    ports = listening_ports(build.pid)
    control = process_cluster.scheduler_address.removeprefix("tcp://")
    seen = intruder.probe(dask=[*(f"127.0.0.1:{p}" for p in ports), control])
    # The cluster lived through every probe: its refusals were its own.
    assert build.poll() is None, "the build ended before the probes: use more photos"
    out, err = build.communicate(timeout=300)
    assert build.returncode == 0, err
    assert seen["uid"] == 65534
    assert seen["dask"].pop(control)[0].startswith("answered")
    # Scheduler, dashboard, and a worker and a nanny for each of the two.
    assert len(seen["dask"]) >= 6, seen
    _refused_everywhere(seen["dask"])


def test_another_user_cannot_use_the_service_or_its_cluster(beach, process_cluster):
    """The service, with the cluster its first build started."""
    second_user_or_skip()
    service = beach
    intruder = Intruder(process_cluster.scheduler_address)
    control = process_cluster.scheduler_address.removeprefix("tcp://")
    ports = listening_ports(service.process.pid)
    routes = ["/health", "/", "/api/indexes", "/api/status", "/api/builds"]
    seen = intruder.probe(
        dask=[*(f"127.0.0.1:{p}" for p in ports), control],
        http=[{"url": service.url + r} for r in routes],
    )
    assert seen["dask"].pop(control)[0].startswith("answered")
    assert len(seen["dask"]) >= 6, seen
    _refused_everywhere(seen["dask"])
    health, *private = seen["http"]
    assert health == '200 {"status": "ok"}'
    for route, answer in zip(routes[1:], private, strict=True):
        assert answer.startswith("401 "), (route, answer)


def test_another_user_cannot_open_the_services_unix_socket(process_cluster):
    second_user_or_skip()
    # pytest's own folders are closed to other users; this one is open, so
    # that only the socket's mode keeps nobody out (the control proves it).
    folder = Path(tempfile.mkdtemp(prefix="imgindex-socket-"))
    try:
        folder.chmod(0o755)
        intruder = Intruder(process_cluster.scheduler_address)
        control = folder / "control.sock"
        with _answering_socket(control):
            sock = folder / "imgindex.sock"
            on_socket = RunningService(
                folder / "indexes", None, None, "--unix-socket", sock
            )
            try:
                auth = {"Authorization": f"Bearer {on_socket.token}"}
                seen = intruder.probe(
                    unix=[
                        {"socket": str(control), "path": "/"},
                        {"socket": str(sock), "path": "/", "headers": auth},
                    ]
                )
            finally:
                assert on_socket.stop() == 0
    finally:
        shutil.rmtree(folder)
    assert seen["uid"] == 65534
    assert seen["unix"][0].startswith("200"), seen
    assert seen["unix"][1] == "refused: PermissionError", seen


@contextlib.contextmanager
def _answering_socket(path: Path):
    """A Unix socket anyone may connect to, answering every request with 200."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o777)
    server.listen(4)
    stop = threading.Event()

    def answer() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        server.close()
