"""Client peak memory of a build, from 2,000 to 50,000 images (issue 9).

    python bench/client_memory.py               # 2k, 10k, 50k: ~10 minutes on 2 cores
    python bench/client_memory.py --sizes 2000 10000
    python bench/client_memory.py --sizes 2000 200000 --modes workers --rerun
    python bench/client_memory.py --code /tmp/imgindex-0.4.0   # another checkout

Each build runs the real pipeline (files on disk, decoding, preprocessing, Dask
tasks on a LocalCluster of worker processes, shards, FAISS) with a cheap 1280-d
model in place of EfficientNet-Lite0 (bench/projection_model.py), so that 50,000
images take minutes; the client's memory does not depend on the model. The
client is its own process (`imgindex build --scheduler ...`), which reports its
peak RSS. Both modes are measured: shards written by the workers, and vectors
streamed to the client (where workers cannot see --out).

The claim under test: with shards written by the workers, the client's peak
grows only with the file records of the manifest (the index is built on the
workers); with vectors streamed to it, also with the index it then builds
(5,128 bytes a vector in a Flat index), and with nothing else of size.
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

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Runs the imgindex CLI in a fresh process with the bench model registered, and
# prints that process's peak RSS (KiB) last.
CLIENT = """
import sys
sys.path.insert(0, {here!r})
import projection_model  # registers bench-projection in the client
from processes import peak_rss
from imgindex.pipeline import build
mode = sys.argv.pop(1)
if mode == "streamed":  # what a client whose workers cannot see --out does
    run = build.run_builds
    build.run_builds = lambda *a, **k: run(*a, **{{**k, "workers_write": False}})
from imgindex.cli import cli
try:
    cli.main(sys.argv[1:], standalone_mode=False)
finally:
    print(peak_rss() // 1024)
"""


def tiny_images(folder: Path, n: int) -> Path:
    """``n`` distinct 48x48 JPEGs (decoding stays cheap; every file is real)."""
    from PIL import Image

    if len(list(folder.rglob("*.jpg"))) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(sub / f"{i:06d}.jpg", quality=80)
    return folder


def build_once(
    data: Path,
    out: Path,
    scheduler: str,
    mode: str,
    code: Path = ROOT,
    rebuild: bool = True,
) -> dict:
    cmd = [
        sys.executable, "-c", CLIENT.format(here=str(HERE)), mode,
        "build", str(data), "--out", str(out), "--json",
        *(["--rebuild"] if rebuild else []),
        "--model", "bench-projection", "--scheduler", scheduler,
        "--partition-size", "256",
    ]  # fmt: skip
    # The client imports imgindex from ``code`` (another checkout: a before
    # and after in one run).
    env = {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=code, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    *report_lines, peak_kib = proc.stdout.strip().splitlines()
    (summary,) = json.loads("\n".join(report_lines))["datasets"]
    return {
        "images": summary["indexed"],
        "vectors": summary["vectors"] + ("" if rebuild else ", re-run"),
        "seconds": summary["seconds"],
        "peak_mib": int(peak_kib) / 1024,
        "index_mib": summary["indexed"] * (1280 * 4 + 8) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 50000])
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data" / "tiny")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["workers", "streamed"],
        default=["workers", "streamed"],
        help="where the vectors go: shards written by the workers, or streamed",
    )
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="after each build, change one image and build again (incremental)",
    )
    parser.add_argument(
        "--code",
        type=Path,
        default=ROOT,
        help="the checkout whose client is measured (default: this one)",
    )
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    sys.path.insert(0, str(HERE))
    from projection_model import RegisterProjectionModel

    rows = []
    with (
        LocalCluster(n_workers=os.cpu_count() or 1, threads_per_worker=1,
                     dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
        tempfile.TemporaryDirectory() as tmp,
    ):  # fmt: skip
        client.register_plugin(RegisterProjectionModel(), name="bench-projection")
        for n in sorted(args.sizes):
            print(f"writing {n} images ...", flush=True)
            data = tiny_images(args.data / str(n), n)
            for mode in args.modes:
                out, address = Path(tmp) / f"out-{n}", cluster.scheduler_address
                runs = [True, False] if args.rerun else [True]
                for rebuild in runs:
                    if not rebuild:  # one image changed since
                        changed = next(data.rglob("*.jpg"))
                        os.utime(changed, ns=(time.time_ns(), time.time_ns()))
                    row = build_once(data, out, address, mode, args.code, rebuild)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                shutil.rmtree(out, ignore_errors=True)

    base = {r["vectors"]: r for r in rows if r["images"] == rows[0]["images"]}
    print()
    print(
        "| images | vectors | client peak RSS | growth over the smallest | "
        "index size | growth minus index |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        b = base[r["vectors"]]
        growth = r["peak_mib"] - b["peak_mib"]
        index_growth = r["index_mib"] - b["index_mib"]
        print(
            f"| {r['images']:,} | {r['vectors']} | {r['peak_mib']:,.0f} MiB | "
            f"{growth:+,.0f} MiB | {r['index_mib']:,.0f} MiB | "
            f"{growth - index_growth:+,.0f} MiB |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
