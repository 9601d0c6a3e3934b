"""Search latency through `imgindex serve`'s API, against the same work done in-process.

A 100,000-vector index: the real embeddings of generated photos plus
synthetic vectors (clustered like embeddings, bench/index_scale.py) for the
rest. Queries are cropped, shrunk, re-encoded copies of the photos, uploaded
as multipart forms; each latency is the client's, from sending the upload to
reading the hits, so it includes the HTTP round trip, decoding the upload,
the embedding and the FAISS search. 1 client sends them one after another,
8 clients at once. The reference, measured in the same run, is the same
decode + embed + search in this process, no HTTP: API p50 / reference p50 is
what the service adds.

    python bench/serve_latency.py --work /tmp/serve-bench [--types flat,hnsw]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex

N_VECTORS = 100_000
N_PHOTOS = 64
N_CENTRES = 256  # other photos whose embeddings the synthetic vectors surround
PER_SHARD = 10_000
ROUNDS = 10  # alternating blocks of reference and API queries


def write_index(dest: Path, photos: list[Path], centres: list[Path], n: int) -> None:
    """``dest``: the photos' real embeddings and ``n - len(photos)`` synthetic ones.

    The synthetic vectors lie around the real embeddings of other generated
    photos (cosine 0.64-0.89 to them), so they fill the region of space that
    embeddings fill: an HNSW graph over them reaches the photos as it would
    in a real collection, which a cloud of vectors elsewhere would not.
    """
    from imgindex.pipeline.discover import ImageRecord
    from imgindex.pipeline.embed import Embedder, ModelSpec
    from imgindex.pipeline.synthetic import write_vector_index

    embedder = Embedder(ModelSpec.from_config())

    def embed(paths: list[Path]) -> np.ndarray:
        return np.concatenate(
            [
                embedder.embed_pixels(
                    [embedder.decode(str(p)) for p in paths[i : i + 32]]
                )
                for i in range(0, len(paths), 32)
            ]
        )

    real = embed(photos)
    around = embed(centres)
    dim = real.shape[1]
    images = dest.parent / "images"
    records = [ImageRecord(str(p.relative_to(images)), 1, 1) for p in photos]
    rng = np.random.default_rng(0)

    def chunks():
        yield records, real
        for start in range(len(photos), n, PER_SHARD):
            count = min(PER_SHARD, n - start)
            which = rng.integers(0, len(around), count)
            noise = rng.standard_normal((count, dim), dtype=np.float32)
            noise /= np.linalg.norm(noise, axis=1, keepdims=True)
            x = (
                around[which]
                + rng.uniform(0.5, 1.2, (count, 1)).astype(np.float32) * noise
            )
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            paths = (f"v/{i:09d}.jpg" for i in range(start, start + count))
            yield [ImageRecord(p, 1, 1) for p in paths], x

    write_vector_index(dest, chunks(), dim, version="bench")


def reindex(dest: Path, index_type: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "imgindex", "reindex", str(dest), "--json"]
        + ["--index-type", index_type],
        capture_output=True,
        text=True,
        env={**os.environ, "DASK_IMGINDEX__LOCAL__N_WORKERS": "1"},
    )
    if out.returncode:
        raise SystemExit(f"reindex failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def crop_copies(photos: list[Path], folder: Path) -> list[tuple[str, bytes]]:
    """(source name, JPEG bytes of a cropped, shrunk, re-encoded copy)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    queries = []
    for p in photos:
        with Image.open(p) as im:
            w, h = im.size
            copy = im.crop((int(w * 0.08), int(h * 0.05), int(w * 0.94), int(h * 0.92)))
            copy = copy.resize((int(w * 0.6), int(h * 0.6)))
            buffer = io.BytesIO()
            copy.save(buffer, "JPEG", quality=70)
        queries.append((p.name, buffer.getvalue()))
    return queries


def reference(searcher, queries: list[tuple[str, bytes]], offset: int, n: int):
    """The same decode + embed + search in this process, one query at a time:
    (seconds per query, how many found their source at rank 1)."""
    times, right = [], 0
    for i in range(offset, offset + n):
        name, data = queries[i % len(queries)]
        started = time.perf_counter()
        pixels = searcher.embedder.decode(io.BytesIO(data))
        hits = searcher.search_pixels([pixels], 10, turns=False)[0]
        times.append(time.perf_counter() - started)
        right += Path(hits[0].path).name == name
    return times, right


# The service's token (it needs one for every route but /health).
TOKEN = secrets.token_urlsafe(24)


class Service:
    def __init__(self, index_root: Path, log: Path):
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imgindex", "serve", "--index-root"]
            + [str(index_root), "--port", "0"],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "IMGINDEX_SERVE_TOKEN": TOKEN},
        )
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.write(line)
            if line.startswith("imgindex serve: http://"):
                self.url = line.split()[2].split("/?")[0].rstrip("/")
                break
        else:
            raise SystemExit(f"imgindex serve did not start (see {log})")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.write(line)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def through_api(
    url: str,
    index: str,
    queries: list[tuple[str, bytes]],
    clients: int,
    per_client: int,
    turns: bool = False,
    offset: int = 0,
):
    """(seconds per query, rank-1 count, wall seconds) of ``clients`` threads
    each sending ``per_client`` uploads one after another."""
    import requests

    times: list[float] = []
    right = [0]
    lock = threading.Lock()

    def client(first: int) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        for i in range(first, first + per_client):
            name, data = queries[i % len(queries)]
            started = time.perf_counter()
            r = session.post(
                f"{url}/api/indexes/{index}/search",
                files={"image": ("q.jpg", data, "image/jpeg")},
                data={"k": "10", "turns": str(turns).lower()},
                timeout=120,
            )
            took = time.perf_counter() - started
            r.raise_for_status()
            with lock:
                times.append(took)
                right[0] += r.json()["hits"][0]["relpath"].endswith("/" + name)

    started = time.perf_counter()
    threads = [
        threading.Thread(target=client, args=(offset + c * per_client,))
        for c in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return times, right[0], time.perf_counter() - started


def _summary(times: list[float], right: int, wall: float | None = None) -> dict:
    ms = sorted(t * 1000 for t in times)
    summary = {
        "queries": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1),
        "rank1": round(right / len(ms), 3),
    }
    if wall:
        summary["queries_per_second"] = round(len(ms) / wall, 1)
    return summary


def measure(url: str, index_dir: Path, queries, n: int) -> dict:
    """Reference and API in alternating blocks, so a machine whose speed
    drifts (shared cores) weighs on both alike; then 8 clients, and turns."""
    from imgindex.pipeline.search import Searcher

    searcher = Searcher(index_dir)
    name = index_dir.name
    through_api(url, name, queries, 1, 10)  # the service opens the index
    reference(searcher, queries, 0, 10)
    ref: tuple[list, int] = ([], 0)
    api: tuple[list, int, float] = ([], 0, 0.0)
    block = max(1, n // ROUNDS)
    for r in range(ROUNDS):
        t, k = reference(searcher, queries, r * block, block)
        ref = (ref[0] + t, ref[1] + k)
        t, k, wall = through_api(url, name, queries, 1, block, offset=r * block)
        api = (api[0] + t, api[1] + k, api[2] + wall)
    row = {"reference": _summary(*ref), "api_1": _summary(*api)}
    row["api_8"] = _summary(*through_api(url, name, queries, 8, max(1, n // 8)))
    row["api_1_turns"] = _summary(
        *through_api(url, name, queries, 1, max(1, n // 4), turns=True)
    )
    row["ratio_p50"] = round(row["api_1"]["p50_ms"] / row["reference"]["p50_ms"], 2)
    return row


def main() -> None:
    from imgindex.pipeline.synthetic import write_photos

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--vectors", type=int, default=N_VECTORS)
    parser.add_argument("--types", default="flat,hnsw")
    parser.add_argument("--queries", type=int, default=200, help="per measurement")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="serve-bench-"))
    indexes = work / "indexes"
    photos = sorted((indexes / "images" / "photos").glob("*.jpg"))
    if len(photos) != N_PHOTOS:
        photos = write_photos(indexes / "images" / "photos", N_PHOTOS, seed=5)
    centres = sorted((work / "centres").glob("*.jpg"))
    if len(centres) != N_CENTRES:
        centres = write_photos(work / "centres", N_CENTRES, seed=6, max_side=400)
    queries = crop_copies(photos, work / "queries")
    results = {"vectors": args.vectors, "cores": os.cpu_count(), "types": {}}
    for index_type in args.types.split(","):
        dest = indexes / index_type
        if not dest.exists():
            t = time.perf_counter()
            write_index(dest, photos, centres, args.vectors)
            built = reindex(dest, index_type)
            print(
                f"{index_type}: {built['index_key']} built in "
                f"{time.perf_counter() - t:.0f} s",
                flush=True,
            )
    service = Service(indexes, work / "serve.log")
    try:
        for index_type in args.types.split(","):
            row = measure(service.url, indexes / index_type, queries, args.queries)
            results["types"][index_type] = row
            print(json.dumps({index_type: row}), flush=True)
    finally:
        service.close()
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict) -> None:
    print(
        "\n| index | in-process p50 / p99 | API, 1 client p50 / p99 | API, 8 clients "
        "p50 / p99 (queries/s) | 1 client with turns p50 | rank 1 |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results["types"].items():
        ref, one, eight, turns = (
            r["reference"],
            r["api_1"],
            r["api_8"],
            r["api_1_turns"],
        )
        print(
            f"| {name} | {ref['p50_ms']} / {ref['p99_ms']} ms | {one['p50_ms']} / "
            f"{one['p99_ms']} ms ({r['ratio_p50']}×) | {eight['p50_ms']} / "
            f"{eight['p99_ms']} ms ({eight['queries_per_second']}) | "
            f"{turns['p50_ms']} ms | {one['rank1']:.0%} |"
        )


if __name__ == "__main__":
    main()
