"""Throughput, memory and search benchmark of imgindex against a plain PyTorch loop.

    python bench/throughput.py                 # ~10 minutes on 2 cores
    python bench/throughput.py --quick         # 1,000 photos, smaller sets, ~5 minutes

Every number is measured in this one run, on the same files, and the targets
are ratios against the reference measured here (absolute speeds drift with
the machine and its other load):

1. reference: one process, a plain PyTorch loop (PIL decode + resize/crop +
   EfficientNet-Lite0), swept over batch sizes, 1 or all threads, and
   eager / channels_last / channels_last with BatchNorm folded; the physical
   limit of the machine is the best one-thread loop running on every core at
   once (measured: one process per core), printed beside the one-thread
   figure times the cores;
2. `imgindex build` with default settings on a LocalCluster: 10 photos as a
   machine's first build (an empty runtime cache: model exported, runtimes
   timed) and as any later one; end to end (the command's own wall time) on
   the first 500 and 1,000 photos and on all of them, where each build's
   fixed cost went (its stage timer), the same
   command again with nothing to do, and steady state (the embed stage of an
   in-process build, with cluster start-up and model loading excluded),
   with peak memory of the client and each worker and where worker time went;
3. client memory on a large build against the bytes of the vectors it holds;
4. search: queries/s on a 100,000-vector index, and one query's latency from
   the command line, model load included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex

from bench.processes import peak_rss  # noqa: E402 (after the path)

CORES = os.cpu_count() or 1


def ensure_photos(
    folder: Path, n: int, min_side: int, max_side: int, seed: int
) -> Path:
    """Generate ``n`` varied JPEGs once; later runs reuse them."""
    from imgindex.pipeline.synthetic import write_photos

    if len(list(folder.glob("*.jpg"))) != n:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"generating {n} photos of {min_side}-{max_side} px in {folder} ...")
        write_photos(folder, n, seed=seed, min_side=min_side, max_side=max_side)
    return folder


# -- 1. the reference: a plain loop ------------------------------------------------


def photo_bench_args(doc: str, n: int, quick: int) -> tuple[argparse.Namespace, int]:
    """The options of a bench over generated photos (``--n``, ``--quick``,
    ``--data``, ``--json``), and how many photos they ask for."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--n", type=int, default=n, help="photos of 500-1,500 px")
    parser.add_argument("--quick", action="store_true", help=f"{quick} photos")
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    return args, quick if args.quick else args.n


def plain_pixels(path: Path) -> np.ndarray:
    """Decode + preprocess the way a plain script would (with JPEG draft mode)."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (256, 256))
        im = im.convert("RGB")
        w, h = im.size
        s = 256 / min(w, h)
        im = im.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - 224) // 2, (h - 224) // 2
        return np.asarray(im.crop((left, top, left + 224, top + 224)), dtype=np.float32)


def reference_run(files, batch: int, threads: int, variant: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    forward, fmt = _reference_model(variant, threads)
    t_decode = t_model = 0.0
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(files), batch):
            t = time.perf_counter()
            arrays = [plain_pixels(p) for p in files[i : i + batch]]
            x = (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) - 127.0) / 128.0
            x = x.contiguous(memory_format=fmt)
            t_decode += time.perf_counter() - t
            t = time.perf_counter()
            forward(x)
            t_model += time.perf_counter() - t
    seconds = time.perf_counter() - started
    return {
        "batch": batch,
        "threads": threads,
        "variant": variant,
        "images_per_second": len(files) / seconds,
        "decode_ms": 1000 * t_decode / len(files),
        "model_ms": 1000 * t_model / len(files),
    }


def _reference_model(variant: str, threads: int):
    """(forward, memory format) of the plain loop: torch eager, channels_last,
    BatchNorm folded, or ONNX Runtime on the graph exported from the folded
    model (pipeline/runtime.py), with ``threads`` intra-op threads."""
    import torch

    from imgindex.pipeline.models import efficientnet_lite0

    if variant == "onnxruntime":
        from imgindex.pipeline.models import get_model
        from imgindex.pipeline.runtime import onnx_graph, onnx_session

        graph = onnx_graph(get_model("efficientnet-lite0", "cpu"))
        session = onnx_session(graph, threads)
        return (
            lambda x: session.run(None, {"pixels": x.numpy()}),
            torch.contiguous_format,
        )
    net = efficientnet_lite0(fold_batchnorm=variant == "folded")
    fmt = torch.contiguous_format if variant == "eager" else torch.channels_last
    net = net.to(memory_format=fmt)
    return (lambda x: net.extract_features(x).mean(dim=(2, 3))), fmt


def _variants() -> tuple[str, ...]:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return ("eager", "channels_last", "folded")
    return ("eager", "channels_last", "folded", "onnxruntime")


def _reference_in_child(files, batch: int, variant: str) -> float:
    reference_run(files[:4], batch, 1, variant)  # warm-up in this process
    return reference_run(files, batch, 1, variant)["images_per_second"]


def concurrent_limit(files, batch: int, variant: str) -> float:
    """Every core running the one-thread loop at once: the machine's real limit.

    One process per core, each on its own share of ``files``; their rates
    add up. This is lower than one loop's rate times the cores on a machine
    whose cores slow each other down (shared caches, memory bandwidth, a VM).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    shares = [files[i::CORES] for i in range(CORES)]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(CORES, mp_context=ctx) as pool:
        rates = pool.map(
            _reference_in_child, shares, [batch] * CORES, [variant] * CORES
        )
        return float(sum(rates))


def reference_sweep(files, batches) -> list[dict]:
    import torch

    results = []
    reference_run(files[:8], 1, 1, "eager")  # warm-up: allocator, kernels
    for threads in sorted({1, CORES}):
        for variant in _variants():
            for batch in batches:
                r = reference_run(files, batch, threads, variant)
                results.append(r)
                print(
                    f"  reference  threads={threads} batch={batch:2d} {variant:13s} "
                    f"{r['images_per_second']:6.1f} images/s"
                )
    torch.set_num_threads(CORES)
    return results


# -- 2. imgindex build ------------------------------------------------------------


def cli_build(
    data: Path,
    out: Path,
    rebuild: bool = True,
    env: dict[str, str] | None = None,
    extra: Sequence[str] = (),
) -> tuple[float, dict]:
    """The real command, default settings (but ``extra`` options); returns
    (wall seconds, --json report) (wall: until its stdout and stderr close,
    as a caller capturing them sees)."""
    cmd = [
        sys.executable,
        "-m",
        "imgindex",
        "build",
        str(data),
        "--out",
        str(out),
        "--json",
        *(["--rebuild"] if rebuild else []),
        *extra,
    ]
    started = time.perf_counter()
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"imgindex build failed:\n{proc.stderr}")
    return wall, json.loads(proc.stdout)


class RssSampler(threading.Thread):
    """Peak resident memory of this process, sampled every 20 ms."""

    def __init__(self):
        import psutil

        super().__init__(daemon=True)
        self.proc = psutil.Process()
        self.baseline = self.proc.memory_info().rss
        self.peak = self.baseline
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.join()


class CpuAccount:
    """CPU seconds each kind of cluster process spent over a window.

    The physical limit gives every core to a model; in a build the client
    (with the LocalCluster's scheduler in the same process), the nannies and
    the workers' own event loops take their share of the same cores, and
    every millisecond they take shows up as slower tasks.
    """

    def __init__(self, worker_pids: set[int]):
        import psutil

        me = psutil.Process()
        self.procs = {"client and scheduler": [me]}
        for child in me.children(recursive=True):
            kind = "workers" if child.pid in worker_pids else "nannies and others"
            self.procs.setdefault(kind, []).append(child)
        self.start = self._now()

    def _now(self) -> dict[str, float]:
        import psutil

        totals = {}
        for kind, procs in self.procs.items():
            seconds = 0.0
            for proc in procs:
                try:
                    t = proc.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                seconds += t.user + t.system
            totals[kind] = seconds
        return totals

    def spent(self) -> dict[str, float]:
        end = self._now()
        return {kind: end[kind] - self.start[kind] for kind in end}


def inprocess_build(data: Path, out: Path, runtime: str = "auto") -> dict:
    """A default LocalCluster build from this process: steady state, memory and
    where the cores' time went."""
    from imgindex.cluster.connect import connect
    from imgindex.cluster.worker import setup_workers
    from imgindex.pipeline.build import run_build
    from imgindex.pipeline.embed import ModelSpec

    spec = ModelSpec.from_config(runtime=runtime)
    with connect() as conn:
        setup_workers(conn.client, spec, wait_for_models=True)
        pids = set(conn.client.run(os.getpid).values())
        cpu = CpuAccount(pids)
        started = time.perf_counter()
        with RssSampler() as rss:
            summary = run_build(conn.client, data, out, spec=spec, rebuild=True)
        wall = time.perf_counter() - started
        spent = cpu.spent()
        workers = conn.client.run(peak_rss)
        threads = sum(conn.client.nthreads().values())
    return {
        "summary": summary.to_json(),
        "client_baseline": rss.baseline,
        "client_peak": rss.peak,
        "worker_peaks": workers,
        "threads": threads,
        "build_seconds": wall,
        "cpu_seconds": spent,
    }


def check_embeddings(index_dir: Path, data: Path, n: int = 32) -> float:
    """Lowest cosine between indexed vectors and the plain eager model's."""
    import torch

    from imgindex.pipeline.models import efficientnet_lite0
    from imgindex.pipeline.store import read_index_dir

    stored = read_index_dir(index_dir)
    net = efficientnet_lite0(fold_batchnorm=False)
    worst = 1.0
    with torch.inference_mode():
        for rec in stored.manifest[:n]:
            from imgindex.pipeline.decode import decode_image

            x = torch.from_numpy(decode_image(data / rec.path).astype(np.float32))
            x = ((x - 127.0) / 128.0).permute(2, 0, 1)[None]
            ref = net.extract_features(x).mean(dim=(2, 3))[0].numpy()
            got = stored.index.reconstruct(rec.id)
            worst = min(worst, float(got @ ref / np.linalg.norm(ref)))
    return worst


# End-to-end targets (x the limit) by collection size: the fixed cost weighs
# most on the smallest.
E2E_TARGETS = {500: 0.7, 1000: 0.8}


def first_photos(data: Path, files: list[Path], n: int, work: Path) -> Path:
    """A folder of the first ``n`` of ``files``, hard-linked where they can
    be, else copied (made once; numbered, as names may repeat in subfolders)."""
    folder = work / f"{data.name}-first-{n}"
    if len(list(folder.glob("*"))) != n:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i, f in enumerate(files[:n]):
            try:
                os.link(f, folder / f"{i:06d}-{f.name}")
            except OSError:  # another file system
                shutil.copy2(f, folder / f"{i:06d}-{f.name}")
    return folder


def fixed_cost(wall: float, report: dict) -> str:
    """Where a build's own time went, stage by stage (its --json stage timer);
    what the command's timer did not see is the interpreter and imports."""
    stages = dict(report["stage_seconds"])
    stages = {"start": wall - report["seconds"], **stages}
    (dataset,) = report["datasets"]
    inner = dataset.get("stage_seconds", {})
    shown = " / ".join(f"{k} {v:.2f}" for k, v in stages.items())
    within = ", ".join(f"{k} {v:.2f}" for k, v in inner.items())
    return f"{shown} s (builds: {within})"


# -- 3. memory on a large build ------------------------------------------------------


def many_files(unique: Path, folder: Path, n: int) -> Path:
    """``n`` files made of hard links to a few hundred unique photos (fast to make)."""
    if len(list(folder.glob("*.jpg"))) != n:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        sources = sorted(unique.glob("*.jpg"))
        for i in range(n):
            os.link(sources[i % len(sources)], folder / f"m{i:06d}.jpg")
    return folder


# -- 4. search ----------------------------------------------------------------------


def search_bench(tmp: Path, n: int, query_image: Path) -> dict:
    import faiss

    from imgindex.pipeline.discover import ImageRecord
    from imgindex.pipeline.embed import normalize_rows
    from imgindex.pipeline.index import build_index
    from imgindex.pipeline.meta import IndexMeta
    from imgindex.pipeline.search import Searcher
    from imgindex.pipeline.store import write_index_dir

    rng = np.random.default_rng(0)
    records = [ImageRecord(f"synthetic/{i:07d}.jpg", 1, 1) for i in range(n)]
    ids = np.array([r.id for r in records], np.int64)
    vectors = normalize_rows(rng.standard_normal((n, 1280), dtype=np.float32))
    index = build_index(ids, vectors)
    meta = IndexMeta(
        name="synthetic",
        source=str(tmp),
        model="efficientnet-lite0",
        dim=1280,
        count=n,
        created="",
        imgindex_version="bench",
    )
    dest = write_index_dir(tmp / "synthetic", index, records, meta, [])
    del index, vectors

    searcher = Searcher(dest)
    queries = normalize_rows(rng.standard_normal((200, 1280), dtype=np.float32))
    faiss.omp_set_num_threads(CORES)
    started = time.perf_counter()
    for q in queries:
        searcher.search_vectors(q[None], 10)
    one_by_one = len(queries) / (time.perf_counter() - started)
    started = time.perf_counter()
    searcher.search_vectors(queries, 10)
    batched = len(queries) / (time.perf_counter() - started)

    cmd = [
        sys.executable,
        "-m",
        "imgindex",
        "search",
        str(dest),
        str(query_image),
        "-k",
        "10",
        "--json",
    ]
    latencies = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        latencies.append(time.perf_counter() - started)
    return {
        "vectors": n,
        "queries_per_second": one_by_one,
        "batched_queries_per_second": batched,
        "cli_latency_seconds": min(latencies),
    }


# -- report -------------------------------------------------------------------------


def _measuring(report: dict) -> float:
    (dataset,) = report["datasets"]
    return dataset["task_seconds"].get("index measure", 0.0)


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images", type=Path, help="folder of images (default: generated)"
    )
    parser.add_argument("--n", type=int, default=2000, help="generated photos")
    parser.add_argument("--memory-images", type=int, default=20000)
    parser.add_argument("--search-vectors", type=int, default=100_000)
    parser.add_argument(
        "--sample", type=int, default=96, help="images per reference run"
    )
    parser.add_argument("--quick", action="store_true", help="smaller sets, fewer runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.n, args.memory_images, args.sample = 1000, 4000, 32

    work = ROOT / "bench-data"
    data = args.images or ensure_photos(work / f"photos-{args.n}", args.n, 300, 1000, 1)
    files = sorted(
        p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
    )
    n = len(files)
    print(f"{n} images in {data}; {CORES} cores")

    print("1. reference: plain PyTorch loop in one process")
    sample = files[:: max(1, n // args.sample)][: args.sample]
    sweep = reference_sweep(sample, (1, 8, 32) if not args.quick else (1, 16))
    one_thread = max(
        (r for r in sweep if r["threads"] == 1), key=lambda r: r["images_per_second"]
    )
    best = max(sweep, key=lambda r: r["images_per_second"])
    naive_limit = one_thread["images_per_second"] * CORES
    limit = concurrent_limit(sample, one_thread["batch"], one_thread["variant"])
    print(f"  {CORES} one-thread loops at once: {limit:.1f} images/s")
    # torch's own limit, for the build that runs torch (--runtime torch).
    torch_one = max(
        (r for r in sweep if r["threads"] == 1 and r["variant"] != "onnxruntime"),
        key=lambda r: r["images_per_second"],
    )
    torch_limit = limit
    if torch_one is not one_thread:
        torch_limit = concurrent_limit(sample, torch_one["batch"], torch_one["variant"])
        print(f"  {CORES} one-thread torch loops at once: {torch_limit:.1f} images/s")

    tmp = Path(tempfile.mkdtemp(prefix="imgindex-bench-"))
    try:
        print("2. imgindex build, default settings, LocalCluster")
        # What a machine's first build pays once (the model loaded with torch,
        # exported to ONNX, both runtimes timed): 10 photos with an empty
        # runtime cache; then the same with the cache every later build has.
        ten = first_photos(data, files, 10, work)
        cli_build(ten, tmp / "ten-warm")  # fills this machine's cache if empty
        first_build = cli_build(
            ten,
            tmp / "ten-first",
            env={"DASK_IMGINDEX__RUNTIME_CACHE": str(tmp / "cache")},
        )
        later_build = cli_build(ten, tmp / "ten-warm")
        e2e = {}
        for size in sorted({s for s in E2E_TARGETS if s < n} | {n}):
            source = data if size == n else first_photos(data, files, size, work)
            e2e[size] = cli_build(source, tmp / f"e2e-{size}")
        wall, report = e2e[n]
        e2e_rate = n / wall
        # The same command again: nothing added, changed or removed.
        noop_wall, noop = cli_build(data, tmp / f"e2e-{n}", rebuild=False)
        inproc = inprocess_build(data, tmp / "steady")
        s = inproc["summary"]
        steady_rate = s["embedded"] / s["stage_seconds"]["embed"]
        worst_cos = check_embeddings(tmp / "steady" / data.name, data)
        task = s["task_seconds"]
        busy = sum(task.values())
        overhead = s["stage_seconds"]["embed"] * inproc["threads"] - busy
        torch_build = None
        if s["runtimes"].get("onnxruntime"):
            print("   and once more with --runtime torch")
            torch_build = inprocess_build(data, tmp / "torch", runtime="torch")
            t = torch_build["summary"]
            torch_rate = t["embedded"] / t["stage_seconds"]["embed"]

        print(f"3. client memory on {args.memory_images} images")
        unique = ensure_photos(work / "unique-400", 400, 240, 420, 2)
        big = many_files(
            unique, work / f"many-{args.memory_images}", args.memory_images
        )
        mem = inprocess_build(big, tmp / "memory")
        vectors_bytes = mem["summary"]["indexed"] * 1280 * 4

        print(f"4. search on {args.search_vectors} vectors")
        search = search_bench(tmp, args.search_vectors, files[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    per = {k: 1000 * v / s["embedded"] for k, v in task.items()}
    cpu_ms = {k: 1000 * v / s["embedded"] for k, v in inproc["cpu_seconds"].items()}
    cores_ms = 1000 * CORES * inproc["build_seconds"] / s["embedded"]
    reasons = s["runtime_reasons"]
    runtimes = "; ".join(
        f"{k} {v} ({reasons.get(k, '')})" for k, v in s["runtimes"].items()
    )
    torch_rows = []
    if torch_build is not None:
        torch_rows = [
            (
                f"torch: {CORES} one-thread loops at once (batch {torch_one['batch']}, "
                f"{torch_one['variant']})",
                f"{torch_limit:.1f} images/s",
            ),
            (
                "torch: imgindex build --runtime torch, steady state",
                f"{torch_rate:.1f} images/s = {torch_rate / torch_limit:.2f} x "
                f"torch's limit, {torch_rate / limit:.2f} x the limit",
            ),
        ]
    rows = [
        (
            "reference, best one-thread setting "
            f"(batch {one_thread['batch']}, {one_thread['variant']})",
            f"{one_thread['images_per_second']:.1f} images/s",
        ),
        (
            f"reference, best of all settings (batch {best['batch']}, "
            f"{best['threads']} threads, {best['variant']})",
            f"{best['images_per_second']:.1f} images/s",
        ),
        (
            f"one-thread reference x {CORES} cores (run alone, then multiplied)",
            f"{naive_limit:.1f} images/s",
        ),
        (
            f"physical limit: {CORES} one-thread loops running at once (measured)",
            f"{limit:.1f} images/s",
        ),
        (
            "imgindex build, steady state (start-up and model load excluded)",
            f"{steady_rate:.1f} images/s = {steady_rate / limit:.2f} x limit "
            "(target >= 0.93)",
        ),
        (
            "a build of 10 photos: a machine's first (empty runtime cache) / later",
            f"{first_build[0]:.2f} s / {later_build[0]:.2f} s",
        ),
        ("  where the later one's time went", fixed_cost(*later_build)),
        *(
            (
                f"imgindex build, end to end on {size} images (wall time "
                f"{e2e[size][0]:.1f} s)",
                f"{size / e2e[size][0]:.1f} images/s = "
                f"{size / e2e[size][0] / limit:.2f} x limit (target >= "
                f"{E2E_TARGETS.get(size, max(E2E_TARGETS.values()))})",
            )
            for size in sorted(e2e)
        ),
        *(
            (f"  where the {size}-image build's time went", fixed_cost(*e2e[size]))
            for size in sorted(e2e)
        ),
        *(
            (
                f"  measuring its index (recall, latency), {size} images",
                f"{_measuring(e2e[size][1]):.2f} s of task time",
            )
            for size in sorted(e2e)
        ),
        (
            "the same build again, nothing added, changed or removed (wall time)",
            f"{noop_wall:.2f} s, cluster {noop['cluster']['kind']} (target <= 1 s)",
        ),
        ("images embedded by each runtime (why)", runtimes),
        *torch_rows,
        (
            "imgindex vs the best single process (steady state)",
            f"{steady_rate / best['images_per_second']:.2f} x",
        ),
        ("embeddings vs the plain eager model, lowest cosine", f"{worst_cos:.5f}"),
        (
            "worker time per image: decode / preprocess / model",
            f"{per.get('decode', 0):.1f} / {per.get('preprocess', 0):.1f} / "
            f"{per.get('model', 0):.1f} ms",
        ),
        (
            "scheduling and transfer overhead per image (idle worker-thread time)",
            f"{1000 * overhead / s['embedded']:.1f} ms",
        ),
        (
            "CPU per image over the build: workers / nannies / client and scheduler",
            " / ".join(
                f"{cpu_ms.get(k, 0):.1f}"
                for k in ("workers", "nannies and others", "client and scheduler")
            )
            + f" ms of the {cores_ms:.1f} ms the cores had for each",
        ),
        (
            "reference per image: decode + preprocess / model (one thread)",
            f"{one_thread['decode_ms']:.1f} / {one_thread['model_ms']:.1f} ms",
        ),
        (
            "client peak RSS during the build (baseline)",
            f"{mib(inproc['client_peak'])} ({mib(inproc['client_baseline'])})",
        ),
        ("worker peak RSS", ", ".join(mib(v) for v in inproc["worker_peaks"].values())),
        (
            f"client on {mem['summary']['indexed']} images: peak RSS growth vs "
            "vectors held",
            f"{mib(mem['client_peak'] - mem['client_baseline'])} vs "
            f"{mib(vectors_bytes)}",
        ),
        (
            f"search, {search['vectors']} vectors, one query at a time",
            f"{search['queries_per_second']:.0f} queries/s",
        ),
        (
            "search, 200 queries in one call",
            f"{search['batched_queries_per_second']:.0f} queries/s",
        ),
        (
            "`imgindex search` one query from the command line, model load included",
            f"{search['cli_latency_seconds']:.2f} s",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    print(f"| {'measure':{width}} | result |")
    print(f"| {'-' * width} | --- |")
    for label, value in rows:
        print(f"| {label:{width}} | {value} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "images": n,
                    "cores": CORES,
                    "reference": sweep,
                    "limit": limit,
                    "naive_limit": naive_limit,
                    "steady_images_per_second": steady_rate,
                    "e2e_images_per_second": e2e_rate,
                    "e2e_wall_seconds": wall,
                    "e2e_by_size": {
                        size: {"wall_seconds": w, "report": r}
                        for size, (w, r) in e2e.items()
                    },
                    "noop_wall_seconds": noop_wall,
                    "cli_report": report,
                    "inprocess": inproc,
                    "torch_limit": torch_limit,
                    "torch_build": torch_build,
                    "memory": mem,
                    "vectors_bytes": vectors_bytes,
                    "search": search,
                    "worst_cosine": worst_cos,
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
