"""Faults on real worker processes: retries, hangs, crashes, killed workers, clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask.config
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from imgindex.cli import cli
from imgindex.pipeline.build import run_build
from imgindex.pipeline.embed import ModelSpec
from imgindex.pipeline.errors import BuildFailed
from imgindex.pipeline.lock import lock_index
from imgindex.pipeline.shards import staging_dir
from imgindex.pipeline.synthetic import write_photos
from tests.conftest import copy_tree
from tests.fault_models import RegisterFaultModels, fault_cluster
from tests.helpers import one_error_line, read_index

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fragile_cluster():
    """Worker processes that give up on a task after one worker death."""
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        fault_cluster() as client,
    ):
        yield client


def dataset_with_trigger(folder: Path, n_good: int) -> Path:
    write_photos(folder, n_good, seed=5, max_side=400)
    Image.new("RGB", (320, 240), (255, 255, 255)).save(folder / "img_trigger.png")
    return folder


@pytest.fixture
def remote_client(process_cluster):
    """A client of the worker processes, which know the fault models.

    (In-process workers would share the client's model cache, so a model
    that fails only on workers would never be loaded there.)
    """
    from distributed import Client

    import tests.fault_models  # noqa: F401  (the client loads the model for its dim)

    with Client(process_cluster, set_as_default=False) as c:
        c.register_plugin(RegisterFaultModels(), name="fault-models")
        yield c


def test_transient_failures_are_retried(remote_client, dataset, tmp_path):
    # Each worker process fails its first load: at most 2 failed attempts.
    spec = ModelSpec(name="test-flaky:1", device="cpu")
    summary = run_build(remote_client, dataset, tmp_path / "out", spec=spec, retries=2)
    assert summary.indexed == 36 and summary.failed == []


def test_persistent_failure_fails_the_build_with_its_cause(
    remote_client, dataset, tmp_path
):
    spec = ModelSpec(name="test-flaky:1000", device="cpu")
    with pytest.raises(BuildFailed, match="after 1 retries: RuntimeError: transient"):
        run_build(remote_client, dataset, tmp_path / "out", spec=spec, retries=1)
    assert not (tmp_path / "out" / "beach").exists()


@pytest.mark.slow
def test_image_that_kills_workers_is_isolated(fragile_cluster, tmp_path):
    data = dataset_with_trigger(tmp_path / "crash", 11)
    spec = ModelSpec(name="test-crash", device="cpu")

    summary = run_build(
        fragile_cluster, data, tmp_path / "out", spec=spec, partition_size=12
    )
    assert [f["path"] for f in summary.failed] == ["img_trigger.png"]
    assert "worker process died" in summary.failed[0]["reason"]
    assert summary.indexed == 11  # its partition-mates were not lost


@pytest.mark.slow
def test_an_image_queued_beside_the_killer_is_not_blamed(fragile_cluster, tmp_path):
    # One image a task: each worker holds a running task and a queued one, so
    # the trigger's worker takes an innocent queued image down with it. Dask
    # reports both as killers; only the one that kills a worker alone is.
    data = tmp_path / "queued"
    write_photos(data, 8, seed=6, max_side=300)
    white = Image.new("RGB", (320, 240), (255, 255, 255))
    white.save(data / "img00001_trigger.png")  # early, so tasks queue behind it
    spec = ModelSpec(name="test-crash", device="cpu")
    summary = run_build(
        fragile_cluster, data, tmp_path / "out", spec=spec, partition_size=1
    )
    assert [f["path"] for f in summary.failed] == ["img00001_trigger.png"]
    assert summary.indexed == 8


@pytest.mark.slow
def test_hung_partition_times_out_and_the_rest_is_indexed(tmp_path):
    data = dataset_with_trigger(tmp_path / "hang", 5)
    spec = ModelSpec(name="test-hang", device="cpu")

    started = time.monotonic()
    with fault_cluster() as client:
        summary = run_build(
            client, data, tmp_path / "out", spec=spec, partition_size=6, task_timeout=2
        )
    assert [f["path"] for f in summary.failed] == ["img_trigger.png"]
    assert "timed out after 2 s" in summary.failed[0]["reason"]
    assert summary.indexed == 5
    assert time.monotonic() - started < 120


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory) -> list[Path]:
    return write_photos(
        tmp_path_factory.mktemp("many") / "many", 96, seed=9, min_side=240, max_side=420
    )


@pytest.mark.slow
def test_sigkilled_worker_loses_no_image(many_photos, tmp_path):
    from distributed import Client, LocalCluster

    data = copy_tree(many_photos, tmp_path / "many")
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        pids = c.run(os.getpid)
        killed = []

        def kill_once(done: int, total: int, failed: int) -> None:
            if done >= 16 and not killed:
                victim = sorted(pids)[0]
                os.kill(pids[victim], signal.SIGKILL)
                killed.append(victim)

        summary = run_build(
            c, data, tmp_path / "out", partition_size=4, progress=kill_once
        )
    assert killed
    stored = read_index(tmp_path / "out" / "many")
    paths = [r.path for r in stored.manifest]
    assert len(paths) == len(set(paths)) == 96 == stored.index.ntotal
    assert summary.failed == []


@pytest.mark.slow
def test_sigkilled_client_resumes_and_matches_a_clean_build(
    many_photos, process_cluster, client, tmp_path
):
    data = copy_tree(many_photos, tmp_path / "many")
    out = tmp_path / "out"
    ckdir = staging_dir(out / "many")
    cmd = [
        sys.executable,
        "-m",
        "imgindex",
        "build",
        str(data),
        "--out",
        str(out),
        "--scheduler",
        process_cluster.scheduler_address,
        "--partition-size",
        "2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(ckdir.glob("*.npz"))) >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "build finished before the kill"
    assert not (out / "many").exists()
    # Workers write the shards themselves, so the tasks that were running when
    # the client died still land theirs: count once the folder stops growing.
    n_saved, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 3:
        n = len(list(ckdir.glob("*.npz")))
        if n != n_saved:
            n_saved, stable_since = n, time.monotonic()
        time.sleep(0.2)

    result = CliRunner().invoke(cli, [*cmd[3:], "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    (summary,) = json.loads(result.stdout)["datasets"]
    assert summary["resumed_partitions"] == n_saved
    assert summary["resumed_images"] == 2 * n_saved
    assert summary["embedded"] == 96 - 2 * n_saved
    assert summary["indexed"] == 96
    assert not ckdir.exists()

    clean = run_build(client, data, tmp_path / "clean")
    assert clean.indexed == 96
    resumed = read_index(out / "many")
    reference = read_index(tmp_path / "clean" / "many")
    assert resumed.manifest == reference.manifest
    ids = np.array([r.id for r in reference.manifest])
    np.testing.assert_allclose(
        resumed.index.reconstruct_batch(ids),
        reference.index.reconstruct_batch(ids),
        atol=1e-5,
    )


def test_second_concurrent_build_is_refused_by_the_cli_before_any_cluster(
    dataset, tmp_path, monkeypatch
):
    """No scheduler is configured, so a build that got past the lock would
    start a LocalCluster (and print its `cluster:` line) before refusing."""
    monkeypatch.delenv("IMGINDEX_SCHEDULER", raising=False)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    out = tmp_path / "out"
    started = time.monotonic()
    with lock_index(out / "beach"):
        result = CliRunner().invoke(
            cli, ["build", str(dataset), "--out", str(out)], catch_exceptions=False
        )
    assert result.exit_code == 1
    line = one_error_line(result.stderr)
    assert line.startswith(f"Error: another build (pid {os.getpid()} on ")
    assert line.endswith("; wait for it to finish")
    assert "cluster:" not in result.stderr
    assert time.monotonic() - started < 30  # seconds at most; a cluster took ~7
    assert not (out / "beach").exists()
