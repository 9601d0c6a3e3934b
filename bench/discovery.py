"""Discovery and planning at scale: a folder tree, a file list and tar shards.

    python bench/discovery.py                      # 1, 3 and 10 million entries
    python bench/discovery.py --sizes 100000       # quicker

Each case runs in a process of its own (so that its peak memory is its own)
and times ``plan_dataset`` alone: listing the dataset and diffing it
against an empty output, with no image read. The listing's units write
their parts (Parquet, pipeline/parts.py) beside the index; the plan's sets
are parts too, written by the diff's tasks a path range each on the cluster
(pipeline/diff.py), so the client holds a window of units and a range's
counts, not the records.
How the data are made (once, into bench-data/, reused by later runs):

- up to 1 million entries: a folder tree of N empty ``.jpg`` files, 1,000 to
  a folder, 100 folders to a top folder (planning stats every file; it
  never opens one), and a ``.txt`` file list naming those same N files
  (read by the listing tasks themselves, in spans of 1 MiB);
- above 1 million (the file list alone): the same layout, but each folder's
  1,000 names are hard links to one empty file of that folder (ext4 allows
  65,000 links to a file, and the machine has 14 million inodes free);
  planning stats each name as it would any file;
- tar shards of 1,000 members each (1 KiB of bytes a member): planning
  stats the shards, never reads them (it plans N / 1,000 shards); their
  members are found by the tasks that embed them. Above 1 million entries
  the shards are hard links to those of the 1 million set (10 GB of shards
  would only be stat'ed).

Entries/s counts the N images either way. The folder tree is run at 1
million at most, as the issue asks.

The folder and the list are listed on the client alone (as before listing
went to the cluster) and with a LocalCluster at hand from the start (2
worker processes here). The client's peak RSS includes the LocalCluster's
scheduler, which runs in the same process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex

DATA = ROOT / "bench-data"
PER_FOLDER = 1000
FOLDERS_PER_TOP = 100
MEMBER = b"\xff" * 1024
LARGEST_WRITTEN = 1_000_000  # entries: larger sets are hard links


def make_tree(n: int, links: bool = False) -> Path:
    """A tree of ``n`` empty ``.jpg`` files; with ``links``, each folder's
    names are hard links to one empty file."""
    tree = DATA / f"{'links' if links else 'tree'}-{n}"
    done = tree / ".complete"
    if done.exists():
        return tree
    what = "hard links" if links else "empty files"
    print(f"writing a tree of {n:,} {what} in {tree} ...", flush=True)
    for k in range(0, n, PER_FOLDER):
        folder = tree / f"t{k // (PER_FOLDER * FOLDERS_PER_TOP):03d}" / f"d{k:09d}"
        folder.mkdir(parents=True, exist_ok=True)
        first = folder / f"img{k:09d}.jpg"
        first.touch()
        for i in range(k + 1, min(n, k + PER_FOLDER)):
            name = folder / f"img{i:09d}.jpg"
            if links:
                os.link(first, name)
            else:
                name.touch()
    done.touch()
    return tree


def make_list(n: int, tree: Path) -> Path:
    listed = DATA / f"{tree.name}.txt"
    if not listed.exists():
        rows = sorted(
            os.path.relpath(os.path.join(top, name), DATA)
            for top, _, files in os.walk(tree)
            for name in files
            if name.endswith(".jpg")
        )
        with open(listed, "w") as f:
            f.writelines(row + "\n" for row in rows)
    return listed


def make_shards(n: int) -> str:
    folder = DATA / f"shards-{n}"
    count = -(-n // PER_FOLDER)
    pattern = f"{folder}/{{000000..{count - 1:06d}}}.tar"
    if (folder / ".complete").exists():
        return pattern
    if n > LARGEST_WRITTEN:
        source = Path(make_shards(LARGEST_WRITTEN).split("{")[0])
        written = -(-LARGEST_WRITTEN // PER_FOLDER)
        print(f"linking {count:,} tar shards in {folder} ...", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        for s in range(count):
            target = folder / f"{s:06d}.tar"
            if not target.exists():
                os.link(source / f"{s % written:06d}.tar", target)
        (folder / ".complete").touch()
        return pattern
    print(f"writing {count:,} tar shards of {PER_FOLDER} members in {folder} ...")
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(count):
        with tarfile.open(folder / f"{s:06d}.tar", "w") as tar:
            for i in range(s * PER_FOLDER, min(n, (s + 1) * PER_FOLDER)):
                info = tarfile.TarInfo(f"img{i:09d}.jpg")
                info.size = len(MEMBER)
                tar.addfile(info, io.BytesIO(MEMBER))
    (folder / ".complete").touch()
    return pattern


def run_case(dataset: str, on_cluster: bool) -> dict:
    """In this process: plan ``dataset`` and report seconds, entries, RSS."""
    import tempfile

    from imgindex.pipeline.build import plan_dataset

    client = cluster = None
    if on_cluster:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, dashboard_address=":0"
        )
        client = Client(cluster)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        with plan_dataset(dataset, out, cluster=client) as planned:
            seconds = time.perf_counter() - started
            plan = planned.plan
            entries = len(plan.to_embed) + len(plan.kept)
            failures = len(plan.known_failures)
    workers = len(client.nthreads()) if client else 0
    if client:
        client.close()
        cluster.close()
    peak = _peak_rss()
    return {
        "entries": entries,
        "failures": failures,
        "seconds": seconds,
        "workers": workers,
        "client_peak_rss": peak,
    }


def _peak_rss() -> int:
    """This process's peak RSS in bytes. VmHWM, not ru_maxrss: on Linux the
    latter keeps the peak of the parent that forked this process before exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def in_child(dataset: str, on_cluster: bool) -> dict:
    cmd = [sys.executable, __file__, "--case", dataset]
    if on_cluster:
        cmd.append("--on-cluster")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"case {dataset} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000000,3000000,10000000")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--on-cluster", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.on_cluster)))
        return

    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        cases = []
        if n <= LARGEST_WRITTEN:
            tree = make_tree(n)
            cases.append(("folder tree", str(tree), (False, True)))
        else:
            tree = make_tree(n, links=True)
        cases.append(("file list", str(make_list(n, tree)), (False, True)))
        cases.append(("tar shards", make_shards(n), (False,)))
        for kind, dataset, modes in cases:
            for on_cluster in modes:
                r = in_child(dataset, on_cluster)
                per_worker = n / r["seconds"] / r["workers"] if r["workers"] else None
                rows.append((n, kind, on_cluster, r, per_worker))
                where = "cluster (2 workers)" if on_cluster else "client alone"
                print(
                    f"{n:>10,} {kind:11} {where:20} {r['seconds']:7.2f} s "
                    f"{n / r['seconds']:>11,.0f} entries/s"
                    f" ({r['entries']:,} planned)"
                    + (f" ({per_worker:,.0f}/s a worker)" if per_worker else "")
                    + f", client peak RSS {r['client_peak_rss'] / 2**20:,.0f} MiB",
                    flush=True,
                )
    print()
    print(
        "| entries | dataset | listed by | seconds | entries/s | a worker "
        "| client peak RSS |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, kind, on_cluster, r, per_worker in rows:
        print(
            f"| {n:,} | {kind} | {'cluster' if on_cluster else 'client'} | "
            f"{r['seconds']:.2f} | {n / r['seconds']:,.0f} | "
            f"{f'{per_worker:,.0f}' if per_worker else '-'} | "
            f"{r['client_peak_rss'] / 2**20:,.0f} MiB |"
        )


if __name__ == "__main__":
    main()
