"""`imgindex search --scheduler-file`: what a search on the cluster spares the
client (an HPC login node), against the same search run there, same queries.

    python bench/search_cluster.py --work /tmp/search-cluster  # 1.5 min on 2 cores

The index: 400 generated photos (pipeline.synthetic.write_photos). The
queries: 200 of them resized to two thirds and re-encoded at quality 80,
searched with -k 3 --copies --jsonl, once with everything here and once with
a real `dask scheduler` and `dask worker --nworkers 2 --nthreads 1` on this
machine doing the embedding and the checks. Printed for each: the wall
time, the CPU seconds of the `imgindex search` process itself (not its
workers'), its peak memory (wait4's ru_maxrss), and whether both runs give
the same hits and kinds. On 2 cores the workers share the client's cores,
so the wall times say little; the client's CPU and memory are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex

from bench.processes import DaskProcesses  # noqa: E402 (after the path)

PHOTOS = 400
QUERIES = 200


def write_set(root: Path) -> tuple[Path, Path]:
    from imgindex.pipeline.synthetic import write_photos

    photos = write_photos(root / "photos", PHOTOS, seed=7)
    queries = root / "queries"
    queries.mkdir()
    for path in photos[:QUERIES]:
        with Image.open(path) as im:
            small = im.resize((im.width * 2 // 3, im.height * 2 // 3))
            small.save(queries / path.name, quality=80)
    return root / "photos", queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/search-cluster"))
    work = parser.parse_args().work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    photos, queries = write_set(work)
    subprocess.run(
        [sys.executable, "-m", "imgindex", "build", str(photos), "--out",
         str(work / "out")],
        check=True, capture_output=True,
    )  # fmt: skip
    index = str(work / "out" / "photos")
    search = ["search", index, str(queries), "-k", "3", "--copies", "--jsonl"]

    rows = {}
    rows["here"] = measured(search)
    cluster = DaskProcesses(work, ["--nworkers", "2", "--nthreads", "1"], 2)
    try:
        where = ["--scheduler-file", str(cluster.scheduler_file)]
        rows["workers"] = measured([*search, *where])
    finally:
        cluster.close()

    here, there = rows["here"]["lines"], rows["workers"]["lines"]
    same = all(
        [(h["path"], h["kind"]) for h in a["hits"]]
        == [(h["path"], h["kind"]) for h in b["hits"]]
        and all(
            abs(x["score"] - y["score"]) < 1e-4
            for x, y in zip(a["hits"], b["hits"], strict=True)
        )
        for a, b in zip(here, there, strict=True)
    )
    copies = sum(h["kind"] == "copy" for line in there for h in line["hits"])
    print(f"{QUERIES} queries (-k 3 --copies) against {PHOTOS} photos; "
          f"{copies} hits told copies on the workers")  # fmt: skip
    print("| where | wall s | client CPU s | client peak MiB |")
    print("| --- | ---: | ---: | ---: |")
    for name, row in rows.items():
        print(
            f"| {name} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} "
            f"| {row['peak_mib']:.0f} |"
        )
    ratio = rows["workers"]["cpu_s"] / rows["here"]["cpu_s"]
    print(f"client CPU on the cluster / here: {ratio:.2f}; same hits and kinds: {same}")
    if not same:
        raise SystemExit("the two searches differ")


def measured(args: list[str]) -> dict:
    """``imgindex ARGS`` as a child process: wall, its own CPU and peak RSS."""
    cmd = [sys.executable, "-m", "imgindex", *args]
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode()[-3000:]
            raise SystemExit(f"imgindex {' '.join(args)} failed:\n{tail}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_mib": usage.ru_maxrss / 1024,
        "lines": [json.loads(line) for line in out.decode().splitlines()],
    }


if __name__ == "__main__":
    main()
