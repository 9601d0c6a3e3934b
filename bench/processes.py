"""A real `dask scheduler` and `dask worker` processes on 127.0.0.1, for the benches."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle

# peak_rss runs on workers too (client.run), which have no bench/ on their
# path: this module's functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def peak_rss() -> int:
    """This process's own peak resident memory, in bytes.

    Not ``ru_maxrss``: Linux carries a parent's peak into a child across
    fork and exec, so a small step started by a bench process that had
    written a million vectors reported that process's peak as its own.
    ``VmHWM`` belongs to the address space, which exec replaces.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_step(script: str, fn: str, *args: str) -> dict:
    """``python SCRIPT --call FN ARGS`` in a fresh process; the JSON of its last
    stdout line. Each step then reports its own peak memory (``peak_rss``),
    no other's."""
    out = subprocess.run(
        [sys.executable, script, "--call", fn, *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise SystemExit(f"{fn} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class DaskProcesses:
    """A scheduler on a free loopback port and one `dask worker` command.

    ``worker_args`` are that command's options (``--nworkers``, ``--nthreads``,
    ``--resources`` ...); ``n_workers`` is how many workers it starts, waited
    for. Logs go to ``folder``/scheduler.log and workers.log.
    """

    def __init__(
        self,
        folder: Path,
        worker_args: list[str],
        n_workers: int = 1,
        env: dict[str, str] | None = None,
    ):
        self.folder = folder
        self.scheduler_file = folder / "scheduler.json"
        self.scheduler_file.unlink(missing_ok=True)  # a stale one from a last run
        # Not the `dask` script: where packages are unpacked rather than
        # installed (bench/gpu_session.sh) there is none beside the interpreter.
        dask = [sys.executable, "-m", "dask"]
        where = ["--scheduler-file", str(self.scheduler_file)]
        local = "--host 127.0.0.1 --port 0 --dashboard-address 127.0.0.1:0".split()
        self.procs = [self._spawn([*dask, "scheduler", *local, *where], "scheduler")]
        deadline = time.monotonic() + 60
        while not self.scheduler_file.exists():
            if time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"dask scheduler did not start (see {folder})")
            time.sleep(0.2)
        worker_env = {**os.environ, **(env or {})}
        self.procs.append(
            self._spawn(
                [*dask, "worker", *where, "--host", "127.0.0.1", *worker_args],
                "workers",
                worker_env,
            )
        )
        from distributed import Client

        with Client(scheduler_file=str(self.scheduler_file)) as c:
            c.wait_for_workers(n_workers, timeout=120)
            self.address = c.scheduler.address

    def _spawn(self, cmd: list[str], name: str, env=None) -> subprocess.Popen:
        with open(self.folder / f"{name}.log", "w") as log:
            return subprocess.Popen(cmd, stdout=log, stderr=log, env=env)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:  # still busy (logging a cancel)
                p.kill()
                p.wait()
