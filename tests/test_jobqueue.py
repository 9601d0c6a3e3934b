"""Requesting worker nodes through dask-jobqueue (job scripts; no batch system here)."""

from __future__ import annotations

import dask.config
import pytest
from click.testing import CliRunner

from imgindex.cli import cli
from imgindex.cluster.jobqueue import make_jobqueue_cluster
from imgindex.pipeline.errors import ImgindexError
from tests.helpers import import_or_skip

import_or_skip("dask_jobqueue")

SLURM = {
    "jobqueue.slurm.cores": 4,
    "jobqueue.slurm.memory": "16GiB",
    "jobqueue.slurm.walltime": "02:00:00",
}


def test_slurm_jobs_run_one_single_threaded_worker_per_core():
    # dask-jobqueue reads its config again when it writes the script.
    with dask.config.set(SLURM):
        cluster = make_jobqueue_cluster("slurm")
        try:
            script = cluster.job_script()
        finally:
            cluster.close()
    assert "#SBATCH --cpus-per-task=4" in script
    assert "#SBATCH -t 02:00:00" in script
    assert "distributed.cli.dask_worker" in script
    assert "--nworkers 4" in script and "--nthreads 1" in script
    assert "--resources" not in script


def test_gpu_jobs_offer_the_gpu_resource():
    with dask.config.set(
        {**SLURM, "jobqueue.slurm.job-extra-directives": ["--gres=gpu:1"]}
    ):
        cluster = make_jobqueue_cluster("slurm", gpu_resource=True)
        try:
            script = cluster.job_script()
        finally:
            cluster.close()
    assert "#SBATCH --gres=gpu:1" in script
    assert "--resources GPU=1" in script


def test_unconfigured_system_says_what_to_set():
    with dask.config.set({"jobqueue.pbs.cores": None, "jobqueue.pbs.memory": None}):
        with pytest.raises(
            ImgindexError, match="set jobqueue.pbs.cores and jobqueue.pbs.memory"
        ):
            make_jobqueue_cluster("pbs")


def build_with_jobqueue(dataset, tmp_path, *extra: str):
    args = [
        "build",
        str(dataset),
        "--out",
        str(tmp_path / "out"),
        "--jobqueue",
        "slurm",
    ]
    return CliRunner().invoke(cli, [*args, *extra], catch_exceptions=False)


def test_missing_submit_command_is_one_line(dataset, tmp_path, monkeypatch):
    # A PATH without sbatch, whether or not this machine has SLURM.
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with dask.config.set(SLURM):
        result = build_with_jobqueue(dataset, tmp_path)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "Error: --jobqueue slurm submits jobs with `sbatch`, which is not on this "
        "machine's PATH; run imgindex on a login node of the cluster"
    ]


@pytest.mark.slow  # starts a cluster or a process
def test_jobs_that_never_start_are_one_line(dataset, tmp_path, monkeypatch):
    """A stand-in `sbatch` that accepts the job and never runs it (a full queue)."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in [("sbatch", "echo 'Submitted batch job 4242'"), ("scancel", "")]:
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\nexit 0\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with dask.config.set({**SLURM, "imgindex.worker-wait": "2s"}):
        result = build_with_jobqueue(dataset, tmp_path, "--jobs", "2")
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: no slurm job started a worker within 2 s")
    assert "submitted 2 slurm job(s)" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "beach").exists()


def test_importing_dask_jobqueue_keeps_our_sigint_handler():
    # dask-jobqueue 0.9 sets SIGINT to sys.exit() on import (upstream #696):
    # Ctrl-C then exited 0 silently with jobs still queued.
    import signal
    import sys

    from imgindex.cluster.jobqueue import _import_dask_jobqueue

    for name in [m for m in sys.modules if m.split(".")[0] == "dask_jobqueue"]:
        del sys.modules[name]  # so that the import runs again
    before = signal.getsignal(signal.SIGINT)
    _import_dask_jobqueue()
    assert "dask_jobqueue.runner" in sys.modules  # the module that replaces it
    assert signal.getsignal(signal.SIGINT) is before


def test_users_scheduler_options_are_kept():
    options = {"dashboard_address": ":9999", "port": 0, "interface": "lo"}
    with dask.config.set({**SLURM, "jobqueue.slurm.scheduler-options": options}):
        cluster = make_jobqueue_cluster("slurm")
        try:
            spec = cluster.scheduler_spec["options"]
        finally:
            cluster.close()
    assert spec["dashboard_address"] == ":9999" and spec["interface"] == "lo"


def test_missing_size_is_one_plain_line(dataset, tmp_path):
    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}):
        result = build_with_jobqueue(dataset, tmp_path)
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: dask-jobqueue cannot describe slurm jobs without")
    assert "SLURMCluster(" not in line and "cluster =" not in line  # no Python
