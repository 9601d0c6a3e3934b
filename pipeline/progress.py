"""A JSON progress file that front ends can poll while a build runs."""

from __future__ import annotations

import collections
import copy
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from imgindex.pipeline.atomic import atomic_file
from imgindex.pipeline.errors import ImgindexError
from imgindex.pipeline.meta import now_stamp

WRITE_INTERVAL = (
    0.5  # seconds between writes while counting; state changes always write
)


RATE_WINDOW = 60.0  # seconds of progress a rate is measured over


class Throughput:
    """Images a second over the last ``window`` seconds of progress, and the
    time left at that rate.

    Over a window rather than since the start: images that go fast (files
    with only a new time, read and kept), a slow start, or workers that
    join or leave would otherwise skew the rate and the ETA for the rest of
    the build.
    """

    def __init__(self, window: float = RATE_WINDOW):
        self.window = window
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, done: int, now: float | None = None) -> None:
        """Count ``done`` images done at ``now`` (default: the monotonic clock)."""
        now = time.monotonic() if now is None else now
        self._samples.append((now, done))
        # The oldest sample kept is the last at or before the window's start.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def per_second(self) -> float | None:
        """None until two samples apart in time and count are known."""
        if len(self._samples) < 2:
            return None
        (t0, done0), (t1, done1) = self._samples[0], self._samples[-1]
        if t1 <= t0 or done1 <= done0:
            return None
        return (done1 - done0) / (t1 - t0)

    def eta_seconds(self, total: int) -> float | None:
        rate = self.per_second()
        return None if rate is None else max(0, total - self._samples[-1][1]) / rate


class ProgressFile:
    """Build state written atomically (temporary file, fsync, rename) to ``path``.

    With ``path`` None it is only kept in memory, for :meth:`snapshot` (the
    service's ``GET /api/builds/<id>``); its methods may be called from the
    build's thread while another reads it.

    Shape::

        {"state": "running", "started": ..., "updated": ..., "pid": ..., "host": ...,
         "cluster": {"kind", "address", "reason", "dashboard"},
         "datasets": [{"name", "state", "total", "done", "failed",
                       "images_per_second", "eta_seconds", "error",
                       "step": {"stage", "name", "done", "total"} once the
                       images are embedded and the index is being built}]}
    """

    def __init__(self, path: str | os.PathLike | None, datasets: list[str]):
        self.path = Path(path) if path is not None else None
        self._lock = threading.RLock()
        self.data: dict[str, Any] = {
            "state": "starting",
            "started": now_stamp(),
            "updated": now_stamp(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "cluster": None,
            "datasets": [
                {
                    "name": n,
                    "state": "pending",
                    "total": None,
                    "done": 0,
                    "failed": 0,
                    "images_per_second": None,
                    "eta_seconds": None,
                    "error": None,
                }
                for n in datasets
            ],
        }
        self._rates: dict[str, Throughput] = {}
        self._last_write = 0.0
        self.write()

    def _dataset(self, name: str) -> dict[str, Any]:
        return next(d for d in self.data["datasets"] if d["name"] == name)

    def set_cluster(self, cluster: dict[str, str]) -> None:
        with self._lock:
            self.data["cluster"] = cluster
            self.data["state"] = "running"
            self.write()

    def update(self, name: str, done: int, total: int, failed: int) -> None:
        with self._lock:
            d = self._dataset(name)
            started = d["state"] == "pending"
            if started:
                d["state"] = "running"
            rate = self._rates.setdefault(name, Throughput())
            rate.add(done)
            d.update(total=total, done=done, failed=failed)
            if rate.per_second() is not None:
                d["images_per_second"] = round(rate.per_second(), 2)
                d["eta_seconds"] = round(rate.eta_seconds(total), 1)
            self.write(force=started or done >= total)

    def step(self, name: str, step: str, done: int, total: int) -> None:
        """After embedding: which index stage runs, and its tasks done."""
        with self._lock:
            d = self._dataset(name)
            changed = (d.get("step") or {}).get("name") != step
            d["step"] = {"stage": "index", "name": step, "done": done, "total": total}
            self.write(force=changed or done >= total)

    def finish_dataset(self, name: str, error: str | None = None) -> None:
        with self._lock:
            d = self._dataset(name)
            d["state"] = "failed" if error else "done"
            d["error"] = error
            d.pop("step", None)
            if not error:
                d["eta_seconds"] = 0.0
            self.write()

    def finish(self, error: str | None = None, state: str | None = None) -> None:
        with self._lock:
            failed = error or any(d["state"] == "failed" for d in self.data["datasets"])
            self.data["state"] = state or ("failed" if failed else "finished")
            for d in self.data["datasets"]:
                if state and d["state"] in ("pending", "running"):
                    d["state"] = state
            if error:
                self.data["error"] = error
            self.write()

    def snapshot(self) -> dict[str, Any]:
        """A copy of the state as the file holds it, safe to serialise."""
        with self._lock:
            return copy.deepcopy(self.data)

    def write(self, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < WRITE_INTERVAL:
            return
        self._last_write = now
        self.data["updated"] = now_stamp()
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.path, "w") as f:
                json.dump(self.data, f, indent=2)
        except OSError as e:
            raise ImgindexError(
                f"cannot write the progress file {str(self.path)!r}: "
                f"{e.strerror or e}; choose another --progress-file"
            ) from None


class DatasetProgress:
    """One dataset's part of a :class:`ProgressFile`, fed by run_build's callbacks
    (a ``pipeline.build.DatasetObserver``)."""

    def __init__(self, progress: ProgressFile, name: str):
        self.progress = progress
        self.name = name

    def update(self, done: int, total: int, failed: int) -> None:
        self.progress.update(self.name, done, total, failed)

    def index_step(self, stage: str, done: int, total: int) -> None:
        from imgindex.pipeline.index_build import STEP_NAMES

        self.progress.step(self.name, STEP_NAMES.get(stage, stage), done, total)

    def close(self, error: str | None = None) -> None:
        self.progress.finish_dataset(self.name, error)


def read_progress(path: str | os.PathLike) -> dict[str, Any]:
    """Read a progress file, noting a build that can no longer be running.

    A build killed with SIGKILL (or on a node that died) never writes its
    final state; ``stale`` says why its "running" cannot be believed: its
    pid is gone on this host, or it has not written for ``STALE_AFTER``.

    Raises
    ------
    ImgindexError
        If it is missing or not a progress file.
    """
    try:
        data = json.loads(Path(path).read_text())
        _check_shape(data)
    except FileNotFoundError:
        raise ImgindexError(f"progress file {str(path)!r} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ImgindexError(
            f"{str(path)!r} is not an imgindex progress file ({type(e).__name__}: {e})"
        ) from None
    if data["state"] in ("starting", "running"):
        data["stale"] = _why_stale(data, Path(path))
    return data


# A running build rewrites its file at least on every finished partition; a
# partition rarely takes more than the default task timeout.
STALE_AFTER = 600.0


def _check_shape(data: Any) -> None:
    if not isinstance(data, dict) or not isinstance(data.get("state"), str):
        raise ValueError("no build state")
    if not isinstance(data.get("datasets"), list):
        raise ValueError("no dataset list")
    for d in data["datasets"]:
        if not isinstance(d, dict):
            raise ValueError(f"dataset entry {d!r}")
        for key, kind in (("name", str), ("state", str), ("done", int)):
            if not isinstance(d.get(key), kind):
                raise ValueError(f"dataset entry without {key!r}")


def _why_stale(data: dict[str, Any], path: Path) -> str | None:
    pid, host = data.get("pid"), data.get("host")
    if host == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"its process {pid} is gone"
        except PermissionError:
            pass
    age = time.time() - path.stat().st_mtime
    if age > STALE_AFTER:
        return f"not updated for {duration(age)}"
    return None


def format_progress(data: dict[str, Any]) -> list[str]:
    """Human-readable lines for ``imgindex status``."""
    cluster = data.get("cluster") or {}
    state = data["state"]
    if data.get("stale"):
        state = f"{state}? probably dead: {data['stale']}"
    lines = [
        f"build {state} (pid {data.get('pid')} on {data.get('host')}, "
        f"started {data.get('started')}, updated {data.get('updated')})"
    ]
    if cluster:
        lines.append(f"cluster: {cluster.get('reason')}")
        if cluster.get("dashboard"):
            lines.append(f"dashboard: {cluster['dashboard']}")
    for d in data["datasets"]:
        total = d.get("total")
        share = f"{d['done']}/{total}" if total is not None else "-"
        if total is None and d["state"] == "done":
            # Finished without a progress report: its index was kept as it was.
            share = "(nothing to embed)"
        pct = f" {100 * d['done'] / total:5.1f}%" if total else ""
        rate = (
            f", {d['images_per_second']:.1f} images/s"
            if d.get("images_per_second")
            else ""
        )
        eta = ""
        if d["state"] == "running" and d.get("eta_seconds") is not None:
            eta = f", ETA {duration(d['eta_seconds'])}"
        line = (
            f"  {d['name']}: {d['state']} {share}{pct}, "
            f"{d.get('failed', 0)} failed{rate}{eta}"
        )
        step = d.get("step")
        if d["state"] == "running" and isinstance(step, dict):
            line += (
                f"; index: {step.get('name')} {step.get('done')}/{step.get('total')}"
            )
        if d.get("error"):
            line += f": {d['error']}"
        lines.append(line)
    return lines


def duration(seconds: float) -> str:
    """``seconds`` as a person reads a time left: 45s, 12m05s, 3h20m."""
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
