"""A dataset copied without its modification times, built again.

    python bench/touched.py            # 600 photos, ~2 minutes on 2 cores
    python bench/touched.py --quick    # 200 photos, under a minute

`imgindex build` on photos of 500-1,500 px (generated as bench/throughput.py's
are), then the same photos copied as `cp -r` copies them (new times, same
bytes) and built with `--moved` into the same index: every file looks changed
to its time, and is read and kept (pipeline/touched.py) rather than embedded.
Both are the real command, timed end to end in this run. Target: the second
build's prepare and embed stages (where the files are read and checked, and
would be embedded) take at most 0.1 of the first's, and it embeds nothing.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex

from bench.throughput import (  # noqa: E402 (after the path)
    cli_build,
    ensure_photos,
    photo_bench_args,
)

TARGET = 0.1  # second build's prepare + embed seconds, of the first's


def work_seconds(report: dict) -> float:
    """Seconds the build spent preparing and embedding (one dataset)."""
    stages = report["datasets"][0]["stage_seconds"]
    return stages.get("prepare", 0.0) + stages.get("embed", 0.0)


def main() -> None:
    args, n = photo_bench_args(__doc__, 600, 200)
    photos = ensure_photos(args.data / f"touched-{n}", n, 500, 1500, seed=11)
    with tempfile.TemporaryDirectory(prefix="imgindex-touched-") as tmp:
        out, copied = Path(tmp, "out"), Path(tmp, "copy", photos.name)
        first_wall, first = cli_build(photos, out)
        shutil.copytree(photos, copied, copy_function=shutil.copyfile)  # new times
        again_wall, again = cli_build(copied, out, rebuild=False, extra=["--moved"])
    built, kept = first["datasets"][0], again["datasets"][0]
    ratio = work_seconds(again) / work_seconds(first)
    results = {
        "photos": n,
        "first": {
            "wall_s": round(first_wall, 2),
            "embedded": built["embedded"],
            "stage_seconds": built["stage_seconds"],
        },
        "copied_without_times": {
            "wall_s": round(again_wall, 2),
            "embedded": kept["embedded"],
            "touched": kept["touched"],
            "stage_seconds": kept["stage_seconds"],
        },
        "prepare_and_embed_ratio": round(ratio, 3),
    }
    print(f"{n} photos of 500-1,500 px, the real command each time:")
    print(
        f"  first build      {first_wall:6.1f} s end to end, "
        f"{work_seconds(first):6.2f} s preparing and embedding, "
        f"{built['embedded']} embedded, index {built['stage_seconds']['index']:.2f} s"
    )
    print(
        f"  copied, no times {again_wall:6.1f} s end to end, "
        f"{work_seconds(again):6.2f} s preparing and embedding, "
        f"{kept['embedded']} embedded, {kept['touched']} read and kept, "
        f"index {kept['stage_seconds']['index']:.2f} s"
    )
    met = ratio <= TARGET and kept["embedded"] == 0 and kept["touched"] == n
    print(
        f"  prepare + embed: {ratio:.3f} of the first build's "
        f"(target <= {TARGET}, nothing embedded): {'met' if met else 'NOT met'}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
