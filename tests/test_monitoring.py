"""Progress file, `imgindex status`, task names on the dashboard, `dask imgindex`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from imgindex.cli import cli
from imgindex.pipeline.build import run_build
from imgindex.pipeline.progress import (
    ProgressFile,
    Throughput,
    format_progress,
    read_progress,
)

DASK = str(Path(sys.executable).parent / "dask")


def test_progress_file_tracks_a_build(tmp_path):
    path = tmp_path / "p.json"
    pf = ProgressFile(path, ["cats", "dogs"])
    assert read_progress(path)["state"] == "starting"
    pf.set_cluster(
        {
            "kind": "local",
            "address": "tcp://x:1",
            "reason": "local: test",
            "dashboard": "http://x:8787/status",
        }
    )
    pf.update("cats", 0, 100, 0)
    pf.update("cats", 100, 100, 3)
    pf.finish_dataset("cats")
    pf.finish_dataset("dogs", error="dataset folder 'dogs' contains no image files")
    pf.finish()
    data = read_progress(path)
    assert data["state"] == "failed"
    cats, dogs = data["datasets"]
    assert (cats["state"], cats["done"], cats["total"], cats["failed"]) == (
        "done",
        100,
        100,
        3,
    )
    assert cats["images_per_second"] > 0 and cats["eta_seconds"] == 0
    assert dogs["state"] == "failed" and "no image files" in dogs["error"]
    assert data["cluster"]["dashboard"] == "http://x:8787/status"
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


def test_the_rate_and_eta_follow_the_last_minute_not_a_fast_start():
    """900 files with only a new time are read and kept in a second, then
    the other 100 are embedded at 1 a second: since the start the rate
    would say 900 images/s and an ETA of a second for the last 90."""
    rate = Throughput(window=60)
    assert rate.per_second() is None
    rate.add(0, now=0.0)
    assert rate.per_second() is None  # one sample: no rate yet
    rate.add(900, now=1.0)
    assert rate.per_second() == 900
    for t in range(2, 72):
        rate.add(900 + (t - 1) // 7, now=float(t))  # a partition of 1 every 7 s
    assert rate.per_second() == pytest.approx(1 / 7, rel=0.15)
    assert rate.eta_seconds(1000) == pytest.approx((1000 - 910) * 7, rel=0.15)
    # Updates further apart than the window still give a rate: from the last.
    sparse = Throughput(window=60)
    sparse.add(10, now=0.0)
    sparse.add(20, now=100.0)
    sparse.add(30, now=300.0)
    assert sparse.per_second() == 10 / 200


def test_status_renders_a_running_build(tmp_path):
    path = tmp_path / "p.json"
    pf = ProgressFile(path, ["cats"])
    pf.set_cluster(
        {
            "kind": "remote",
            "address": "tcp://n1:8786",
            "reason": "remote tcp://n1:8786: 4 workers",
            "dashboard": "http://n1:8787/status",
        }
    )
    pf.update("cats", 0, 1000, 0)
    pf.update("cats", 250, 1000, 2)
    pf.write()  # updates are throttled to two writes a second
    result = CliRunner().invoke(cli, ["status", str(path)])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("build running (pid ")
    assert lines[1] == "cluster: remote tcp://n1:8786: 4 workers"
    assert lines[2] == "dashboard: http://n1:8787/status"
    assert lines[3].startswith("  cats: running 250/1000  25.0%, 2 failed, ")
    assert ", ETA " in lines[3]
    as_json = CliRunner().invoke(cli, ["status", str(path), "--json"])
    assert json.loads(as_json.stdout)["datasets"][0]["done"] == 250
    # After the last image, the index is built: its stage is what runs.
    pf.update("cats", 1000, 1000, 2)
    pf.step("cats", "adding vectors", 3, 8)
    shown = CliRunner().invoke(cli, ["status", str(path)]).stdout.splitlines()
    assert shown[3].endswith("; index: adding vectors 3/8")
    pf.finish_dataset("cats")
    assert "step" not in read_progress(path)["datasets"][0]


@pytest.mark.slow  # starts a cluster or a process
def test_output_piped_into_a_reader_that_leaves_is_quiet(tmp_path):
    # `imgindex status P | head -1`: head exits, the next write meets a closed pipe.
    path = tmp_path / "p.json"
    ProgressFile(path, [f"dataset-{i}" for i in range(2000)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgindex", "status", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # before it writes a line
    _, err = proc.communicate(timeout=60)
    assert err.decode() == "" and proc.returncode == 141


def test_status_of_a_missing_file_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["status", str(tmp_path / "none.json")])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: progress file {str(tmp_path / 'none.json')!r} does not exist"
    )


def test_format_handles_a_pending_dataset():
    data = {
        "state": "starting",
        "datasets": [
            {"name": "a", "state": "pending", "total": None, "done": 0, "failed": 0}
        ],
    }
    assert format_progress(data)[-1] == "  a: pending -, 0 failed"


def test_task_keys_name_the_dataset(client, dataset, tmp_path):
    from distributed import get_task_stream

    with get_task_stream(client) as stream:
        run_build(client, dataset, tmp_path / "out", partition_size=8)
    stages = {str(t["key"]).split("]-")[0] + "]" for t in stream.data}
    # Flat (few vectors): no train or merge; the index is filled on a worker
    # and measured in one task (tests/test_index.py has the larger stages).
    assert stages == {"embed[beach]", "index.add[beach]", "index.evaluate[beach]"}


class FirstResults:
    """A scheduler plugin noting, as each embed task finishes, how many embed
    tasks the scheduler knows: the dashboard's progress bar total."""

    name = "imgindex-test-first-results"

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.known_at_finish: list[int] = []
        self.most_on_a_worker = 0

    def transition(self, key, start, finish, *args, **kwargs):
        if finish == "memory" and str(key).startswith("embed["):
            known = sum(str(k).startswith("embed[") for k in self.scheduler.tasks)
            self.known_at_finish.append(known)
        on_workers = (len(ws.processing) for ws in self.scheduler.workers.values())
        self.most_on_a_worker = max(self.most_on_a_worker, *on_workers)


_GATE = threading.Event()  # in-process workers share it with the test


def _hold_the_thread() -> None:
    assert _GATE.wait(120), "the test never opened the gate"


def test_the_scheduler_knows_every_partition_from_the_start(
    client, dataset, tmp_path, monkeypatch
):
    """The whole job is on the dashboard at once, not a window of it: the
    scheduler holds all 36 partitions (sent in five messages: the batch is
    shrunk to 8 to make five) before any finishes. Each worker's one thread
    is held by a gate task until then, so no speed of the machine decides
    it; a windowed dispatch would wait for results that cannot come."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    from imgindex.pipeline import dispatch

    monkeypatch.setattr(dispatch, "SUBMIT_BATCH", 8)
    scheduler = client.cluster.scheduler
    plugin = type("Plugin", (FirstResults, SchedulerPlugin), {})(scheduler)
    scheduler.add_plugin(plugin)
    _GATE.clear()
    gates = [
        client.submit(_hold_the_thread, workers=[w], pure=False)
        for w in client.nthreads()
    ]
    result: dict = {}
    build = threading.Thread(
        target=lambda: result.update(
            summary=run_build(client, dataset, tmp_path / "out", partition_size=1)
        )
    )
    try:
        build.start()
        deadline = time.monotonic() + 60  # the gates hold for 120
        known = 0
        while known < 36 and time.monotonic() < deadline and build.is_alive():
            known = sum(str(k).startswith("embed[") for k in scheduler.tasks)
            time.sleep(0.05)
        assert known == 36, f"the scheduler knew {known} partitions, not all 36"
        assert plugin.known_at_finish == []  # none had finished
    finally:
        _GATE.set()
        build.join(300)
        client.gather(gates)
        scheduler.remove_plugin(plugin.name)
    summary = result["summary"]
    assert summary.partitions == summary.indexed == 36
    assert set(plugin.known_at_finish) == {36}
    # The scheduler kept the rest queued: a one-thread worker never held more
    # than ceil(1.1 x 1) = 2 tasks (distributed.scheduler.worker-saturation).
    assert plugin.most_on_a_worker <= 2


def test_a_build_larger_than_max_queued_partitions_goes_out_in_a_window(
    client, dataset, tmp_path
):
    import dask.config
    from distributed.diagnostics.plugin import SchedulerPlugin

    scheduler = client.cluster.scheduler
    plugin = type("Plugin", (FirstResults, SchedulerPlugin), {})(scheduler)
    scheduler.add_plugin(plugin)
    try:
        with dask.config.set({"imgindex.max-queued-partitions": 8}):
            summary = run_build(client, dataset, tmp_path / "out", partition_size=1)
    finally:
        scheduler.remove_plugin(plugin.name)
    assert summary.indexed == 36
    # Finished partitions are held (workers write shards), so the count grows
    # by one a result, from 8 known when the first one finished.
    assert plugin.known_at_finish[0] == 8


def spans_of(client) -> dict[tuple[str, ...], set[str]]:
    """The scheduler's spans: their tags -> the task groups directly in them."""

    def spans(dask_scheduler=None):
        ext = dask_scheduler.extensions["spans"]
        return {
            tuple(s.name): sorted({str(g.name) for g in s.groups})
            for s in ext.spans.values()
        }

    return {k: set(v) for k, v in client.run_on_scheduler(spans).items()}


def test_two_concurrent_builds_are_two_spans(client, photo_sets, tmp_path):
    """Each build is its own Dask span with an embed and an index stage, so the
    Fine Performance Metrics and Groups pages keep two builds apart."""
    import threading

    builds = {"a": ("beach", {}), "b": ("forest", {})}
    errors = []

    def build(build_id: str, name: str) -> None:
        try:
            builds[build_id][1]["summary"] = run_build(
                client,
                photo_sets[name][0].parent,
                tmp_path / "out",
                partition_size=4,
                build_id=f"test-{build_id}",
            )
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [
        threading.Thread(target=build, args=(b, name))
        for b, (name, _) in builds.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    spans = spans_of(client)
    for build_id, (name, _) in builds.items():
        top = (f"imgindex build test-{build_id}", name)
        assert top in spans, spans.keys()
        assert spans[top + ("embed",)] == {f"embed[{name}]"}
        assert spans[top + ("index",)] == {
            f"index.{stage}[{name}]" for stage in ("add", "evaluate")
        }


@pytest.mark.slow  # starts a cluster or a process
def test_dask_cli_has_imgindex_and_its_config():
    out = subprocess.run([DASK, "imgindex", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "build" in out.stdout and "search" in out.stdout
    cfg = subprocess.run(
        [DASK, "config", "get", "imgindex.partition-size"],
        capture_output=True,
        text=True,
    )
    assert cfg.stdout.strip() == "auto"


def test_status_doubts_a_progress_file_nobody_updates(tmp_path):
    # Issue 8, item 11: a build on another host, killed: only the file's age shows it.
    import json
    import os
    import time

    from click.testing import CliRunner

    from imgindex.cli import cli

    path = tmp_path / "p.json"
    path.write_text(
        json.dumps(
            {
                "state": "running",
                "pid": 1,
                "host": "another-node",
                "datasets": [{"name": "traps", "state": "running", "done": 5}],
            }
        )
    )
    hour_ago = time.time() - 3600
    os.utime(path, (hour_ago, hour_ago))
    result = CliRunner().invoke(cli, ["status", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("build running? probably dead: not updated for 1h")
