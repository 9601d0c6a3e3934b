"""imgindex on a real one-node SLURM (issue 8, items 19-24). Run by `make test-hpc`.

tests/hpc/run.sh starts slurmctld, slurmd and munge inside a loopback-only
network namespace and runs these tests there; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from imgindex.pipeline.synthetic import write_photos
from tests.helpers import (
    imgindex_cmd,
    one_error_line,
    read_index,
    start_imgindex,
    wait_for_progress,
)

pytestmark = pytest.mark.slow

ROOT = Path(os.environ.get("IMGINDEX_HPC_ROOT", "/tmp"))
GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide" / "hpc.md"
CPUS = os.cpu_count() or 1
N_IMAGES = 60
JOBQUEUE = {
    "DASK_JOBQUEUE__SLURM__CORES": str(CPUS),
    "DASK_JOBQUEUE__SLURM__MEMORY": "4GiB",
    "DASK_JOBQUEUE__SLURM__WALLTIME": "00:20:00",
    "DASK_IMGINDEX__WORKER_WAIT": "180s",
}


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, check=False, **kwargs
    )


def queued() -> list[str]:
    return run("squeue", "-h", "-o", "%i").stdout.split()


def job_state(job_id: str) -> str:
    out = run("scontrol", "show", "job", job_id, "-o").stdout
    match = re.search(r"JobState=(\w+)", out)
    return match.group(1) if match else "UNKNOWN"


def wait_until_queue_empty(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while queued() and time.monotonic() < deadline:
        time.sleep(1)
    assert not queued(), run("squeue").stdout


@pytest.fixture(autouse=True)
def clean_queue():
    yield
    run("scancel", "--user", "root")
    run("scontrol", "update", f"nodename={socket.gethostname().split('.')[0]}",
        "state=resume")  # fmt: skip
    wait_until_queue_empty()


@pytest.fixture(scope="module")
def traps() -> Path:
    folder = ROOT / "data" / "traps"
    write_photos(folder, N_IMAGES, seed=8, max_side=320)
    return folder


def guide_sbatch_script() -> str:
    """The HPC guide's sbatch script, exactly as a user would copy it."""
    text = GUIDE.read_text()
    start = text.index("<!-- sbatch-script")
    body = text[start:].split("```bash\n", 1)[1].split("```", 1)[0]
    assert body.startswith("#!/bin/bash")
    return body


def test_guide_sbatch_script_runs_as_written(traps, tmp_path):
    out = ROOT / "indexes"
    # Only the two placeholder paths are replaced; the script is the guide's.
    script = guide_sbatch_script()
    script = script.replace("/shared/traps", str(traps))
    script = script.replace("/shared/indexes", str(out))
    # Then the search the guide's next paragraph runs on the job's workers:
    # every photo as a query, each its own first hit, told identical there.
    found = tmp_path / "search.jsonl"
    script += (
        f"imgindex search {out}/traps {traps} -k 2 --copies --jsonl "
        f'--scheduler-file "$SCHED" --no-fallback > {found}\n'
    )
    path = tmp_path / "imgindex.sbatch"
    path.write_text(script)
    # The guide asks for 4 nodes x 32 CPUs; this cluster has one node, so the
    # size is given on the command line, as users override #SBATCH lines.
    submitted = run(
        "sbatch", "--parsable", "--nodes=1", f"--cpus-per-task={CPUS}",
        f"--output={tmp_path}/job-%j.log", f"--chdir={tmp_path}", path,
        env={**os.environ, "SHARED": str(tmp_path / "shared")},
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 420
    while job_state(job) in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(2)
    log = (tmp_path / f"job-{job}.log").read_text()
    assert job_state(job) == "COMPLETED", log
    assert not tracebacks_beyond_teardown(log), log
    assert read_index(out / "traps").index.ntotal == N_IMAGES
    progress = json.loads((tmp_path / "shared" / "traps-progress.json").read_text())
    assert progress["state"] == "finished"
    assert "cluster: remote tcp://" in log
    lines = [json.loads(line) for line in found.read_text().splitlines()]
    assert len(lines) == N_IMAGES
    for line in lines:
        first = line["hits"][0]
        assert (first["path"], first["kind"]) == (line["query"], "identical")


# As the job ends, SLURM stops the scheduler and worker steps at once, and
# Dask logs a peer's closed stream at INFO with its traceback. That is the
# user's own dask processes ending, not imgindex: any other traceback fails.
_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - ")


def tracebacks_beyond_teardown(log: str) -> list[str]:
    """Each traceback's log record, except Dask's closed-stream ones."""
    found, record = [], ""
    for line in log.splitlines():
        if _LOG_RECORD.match(line):
            record = line
        elif line.startswith("Traceback") and "Batched Comm Closed" not in record:
            found.append(record or line)
    return found


def jobqueue_build(traps, out, *extra, env=None) -> subprocess.CompletedProcess:
    return run(
        *imgindex_cmd("build", traps, "--out", out, "--json", "--jobqueue", "slurm",
                      *extra),
        env={**os.environ, **JOBQUEUE, **(env or {})},
        timeout=600,
    )  # fmt: skip


def test_jobqueue_build_keeps_job_logs_under_out(traps, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where slurm-N.out files used to land
    result = jobqueue_build(traps, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["datasets"][0]["indexed"] == N_IMAGES
    logs = Path(report["cluster"]["job_logs"])
    assert logs == tmp_path / "out" / ".imgindex-jobs"
    assert list(logs.glob("*.out")) or list(logs.glob("*.err"))
    assert not list(tmp_path.glob("slurm-*.out"))
    assert report["cluster"]["workers"] == CPUS

    # The index searched by a job of its own, its log beside the build's.
    before = set(logs.iterdir())
    found = run(
        *imgindex_cmd("search", tmp_path / "out" / "traps", traps, "-k", 1,
                      "--jsonl", "--jobqueue", "slurm", "--jobs", 1),
        env={**os.environ, **JOBQUEUE}, timeout=600,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert "cluster: " in found.stderr and "slurm" in found.stderr
    lines = [json.loads(line) for line in found.stdout.splitlines()]
    assert len(lines) == N_IMAGES
    assert all(line["hits"][0]["path"] == line["query"] for line in lines)
    assert set(logs.iterdir()) > before
    assert not list(tmp_path.glob("slurm-*.out"))
    wait_until_queue_empty()  # its job cancelled as the search ended


def test_busy_queue_is_waited_for_and_explained(traps, tmp_path):
    sleeper = run(
        "sbatch", "--parsable", f"-c{CPUS}", f"--output={tmp_path}/sleeper.out",
        "--wrap", "sleep 40",
    )  # fmt: skip
    assert sleeper.returncode == 0, sleeper.stderr
    result = jobqueue_build(traps, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "1 job pending: Resources" in result.stderr
    assert json.loads(result.stdout)["datasets"][0]["indexed"] == N_IMAGES


def test_rejected_submission_is_one_line_at_once(traps, tmp_path):
    started = time.monotonic()
    result = jobqueue_build(
        traps, tmp_path / "out", env={"DASK_JOBQUEUE__SLURM__QUEUE": "nosuch"}
    )
    assert result.returncode == 1
    assert time.monotonic() - started < 60
    line = one_error_line(result.stderr)
    assert line.startswith("Error: slurm rejected the job: sbatch: error:")
    assert "nosuch" in line.lower() or "partition" in line.lower()
    assert "submitted" not in result.stderr
    assert not queued()


def test_jobs_that_can_never_start_give_up_after_the_queue_wait(traps, tmp_path):
    host = socket.gethostname().split(".")[0]
    drained = run("scontrol", "update", f"nodename={host}", "state=drain",
                  "reason=test")  # fmt: skip
    assert drained.returncode == 0, drained.stderr
    result = jobqueue_build(
        traps, tmp_path / "out", env={"DASK_IMGINDEX__JOBQUEUE__QUEUE_WAIT": "15s"}
    )
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert "no slurm job started within 15 s" in line and "pending" in line
    wait_until_queue_empty(30)  # cancelled, not left in the queue


def test_sigterm_with_jobqueue_cancels_the_jobs(tmp_path):
    # Ten times the other tests' images: 60 were embedded within the half
    # second between two writes of the progress file once, and the SIGTERM
    # found the build done.
    traps = ROOT / "data" / "many-traps"
    write_photos(traps, 10 * N_IMAGES, seed=9, max_side=320)
    progress = tmp_path / "progress.json"
    build = start_imgindex(
        "build", traps, "--out", tmp_path / "out", "--jobqueue", "slurm",
        "--partition-size", "4", "--progress-file", progress, env=JOBQUEUE,
    )  # fmt: skip
    seen = wait_for_progress(progress, 4, build, timeout=300)
    os.kill(build.pid, signal.SIGTERM)
    _, err = build.communicate(timeout=120)
    assert build.returncode == 143, (seen["datasets"][0], err[-2000:])
    assert one_error_line(err).startswith("Error: interrupted by SIGTERM")
    assert json.loads(progress.read_text())["state"] == "interrupted"
    wait_until_queue_empty(60)
