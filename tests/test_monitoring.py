"""Progress file, `imgindex status`, task names on the dashboard, `dask imgindex`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from pipeline.build import run_build
from pipeline.cli import cli
from pipeline.progress import ProgressFile, format_progress, read_progress

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


def test_output_piped_into_a_reader_that_leaves_is_quiet(tmp_path):
    # `imgindex status P | head -1`: head exits, the next write meets a closed pipe.
    path = tmp_path / "p.json"
    ProgressFile(path, [f"dataset-{i}" for i in range(2000)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "status", str(path)],
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
    # Flat (few vectors): no train or merge; the index is filled on a worker.
    assert stages == {
        "embed[beach]",
        "index-add[beach]",
        "index-queries[beach]",
        "index-exact[beach]",
        "index-evaluate[beach]",
    }


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

    from pipeline.cli import cli

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
