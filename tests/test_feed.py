"""The GPU worker's path, as far as a CPU can test it (issue 11): images decoded
by a pool of threads into batches, the model a batch behind, mixed precision
close to fp32, GPU-sized tasks; and CPU workers left as they were."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import threading

import dask.config
import numpy as np
import pytest
from distributed import Client, LocalCluster
from PIL import Image

from imgindex.pipeline.decode import center_crop
from imgindex.pipeline.discover import ImageRecord
from imgindex.pipeline.embed import GPU_BATCH_SIZE, Embedder, ModelSpec, _embed
from imgindex.pipeline.errors import ConfigError, DecodeError
from imgindex.pipeline.feed import BatchFeed
from imgindex.pipeline.shards import spec_key
from tests.helpers import (
    imgindex_cmd,
    import_or_skip,
    invoke,
    one_error_line,
    read_index,
)

skdata = import_or_skip("skimage.data")


def fake_decode(delays: dict[str, float] | None = None):
    """Decode "img-<n>" into a crop filled with n % 251; "bad-*" fails."""

    def decode(path: str) -> np.ndarray:
        if path.startswith("bad"):
            raise DecodeError(path, "broken on purpose")
        if delays and path in delays:
            threading.Event().wait(delays[path])
        return np.full((4, 4, 3), int(path.split("-")[1]) % 251, np.uint8)

    return decode


def names(n: int, bad: set[int] = frozenset()) -> list[str]:
    return [f"bad-{i}" if i in bad else f"img-{i}" for i in range(n)]


@pytest.mark.parametrize("threads", [1, 4])
def test_batches_keep_order_and_leave_bad_images_out(threads):
    paths = names(23, bad={0, 5, 6, 22})
    feed = BatchFeed(paths, fake_decode(), (4, 4, 3), batch_size=8, threads=threads)
    batches = list(feed)
    assert [len(b.paths) + len(b.failures) for b in batches] == [8, 8, 7]
    got = [p for b in batches for p in b.paths]
    assert got == [p for p in paths if p.startswith("img")]
    assert [f.path for b in batches for f in b.failures] == [
        "bad-0",
        "bad-5",
        "bad-6",
        "bad-22",
    ]
    assert {f.reason for b in batches for f in b.failures} == {"broken on purpose"}


def test_a_held_batch_is_not_overwritten_while_the_model_uses_it():
    # The embedder keeps the previous batch on the GPU while it takes the
    # next; its pixels must stay intact although the pool decodes ahead.
    # Slow images make the pool's timing vary.
    paths = names(200, bad={3, 50, 51, 52, 53, 54, 55, 56, 57})
    slow = {p: 0.01 for p in paths[::7]}
    feed = BatchFeed(paths, fake_decode(slow), (4, 4, 3), batch_size=8, threads=6)
    previous = None
    for batch in feed:
        for b in (previous, batch):
            if b is not None:
                values = np.asarray(b.pixels)[:, 0, 0, 0].tolist()
                assert values == [int(p.split("-")[1]) % 251 for p in b.paths]
        previous = batch


class CountingDecode:
    """fake_decode that counts its calls (any thread)."""

    def __init__(self):
        self.calls = 0
        self._lock = threading.Lock()
        self._decode = fake_decode()

    def __call__(self, path: str) -> np.ndarray:
        with self._lock:
            self.calls += 1
        return self._decode(path)


def _settle(threads: int) -> None:
    """Wait until the shared decode pool has run (or dropped) what was queued."""
    from imgindex.pipeline.feed import decode_pool

    # Every thread must hold one of these at once: none is still decoding.
    everyone = threading.Barrier(threads)
    pool = decode_pool(threads)
    for job in [pool.submit(everyone.wait, 30) for _ in range(threads)]:
        job.result(timeout=60)


def test_threads_decode_ahead_of_the_consumer():
    # While the consumer holds batch 1, the pool decodes batches 2 and 3, and
    # no further: two batches ahead, as asked.
    decode = CountingDecode()
    feed = BatchFeed(names(48), decode, (4, 4, 3), batch_size=8, threads=4, ahead=2)
    batches = iter(feed)
    next(batches)
    _settle(4)
    assert decode.calls == 24
    assert [len(next(batches).paths) for _ in range(5)] == [8] * 5


def test_a_consumer_may_stop_early():
    decode = CountingDecode()
    feed = BatchFeed(names(100), decode, (4, 4, 3), batch_size=4, threads=3)
    batches = iter(feed)
    for i, _ in enumerate(batches):
        if i == 2:
            break
    batches.close()  # what dropping the generator does
    _settle(3)
    stopped_at = decode.calls
    # The batches taken and those decoded ahead at most; the rest never ran.
    assert stopped_at <= (3 + feed.ahead) * 4 < 100
    _settle(3)
    assert decode.calls == stopped_at


def real_photos(tmp_path, n_synthetic: int = 6) -> tuple[str, list[str]]:
    """Real photographs (scikit-image's) and synthetic ones, plus a broken file."""
    from imgindex.pipeline.synthetic import write_photos

    for name in (
        "chelsea",
        "coffee",
        "astronaut",
        "rocket",
        "cat",
        "immunohistochemistry",
    ):
        rgb = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        rgb.save(tmp_path / f"{name}.jpg")
    write_photos(tmp_path, n_synthetic, seed=3, min_side=300, max_side=700)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return str(tmp_path), sorted(p.name for p in tmp_path.iterdir())


def test_threaded_batches_embed_like_the_serial_cpu_path(tmp_path):
    root, rel = real_photos(tmp_path)
    records = [ImageRecord(r, 0, 0) for r in rel]
    serial = _embed(root, records, ModelSpec(device="cpu"))
    pooled = _embed(
        root, records, ModelSpec(device="cpu", batch_size=4, decode_threads=3)
    )
    assert pooled.paths == serial.paths and len(serial.paths) == len(rel) - 1
    np.testing.assert_array_equal(pooled.ids, serial.ids)
    assert pooled.failures == serial.failures
    assert [f.path for f in serial.failures] == ["broken.jpg"]
    cosine = np.sum(pooled.vectors * serial.vectors, axis=1)
    assert cosine.min() > 0.99999
    # The serial path is what CPU workers have always run (no pool).
    assert "decode-wait" not in serial.timings
    assert isinstance(pooled.timings["decode-wait"], float)


def test_cpu_workers_keep_batch_1_one_thread_and_fp32():
    e = Embedder(ModelSpec(device="cpu"))
    assert (e.batch_size, e.decode_threads, e.precision) == (1, 1, "fp32")
    e = Embedder(
        ModelSpec(device="cpu", batch_size=16, decode_threads=2, precision="fp16")
    )
    assert (e.batch_size, e.decode_threads, e.precision) == (16, 2, "fp16")


def embed_in(precision: str, pixels: list[np.ndarray]) -> np.ndarray:
    return Embedder(ModelSpec(device="cpu", precision=precision)).embed_pixels(pixels)


def test_fp16_autocast_stays_within_cosine_0_999_of_fp32():
    pre = Embedder(ModelSpec(device="cpu")).model.preprocess
    photos = ("chelsea", "coffee", "astronaut", "rocket", "camera", "hubble_deep_field")
    pixels = [
        center_crop(
            Image.fromarray(getattr(skdata, name)()).convert("RGB"),
            pre.resize,
            pre.crop,
        )
        for name in photos
    ]
    exact = embed_in("fp32", pixels)
    half = embed_in("fp16", pixels)
    cosine = np.sum(exact * half, axis=1)
    assert cosine.min() >= 0.999, cosine
    np.testing.assert_allclose(np.linalg.norm(half, axis=1), 1.0, rtol=1e-5)
    # bf16 keeps 8 bits of mantissa: measured further from fp32 on this
    # model, which is why auto picks fp16 (docs/guide/gpus.md).
    brain = np.sum(exact * embed_in("bf16", pixels), axis=1)
    assert 0.98 < brain.min() < cosine.min()


def test_an_fp16_overflow_is_recomputed_in_fp32():
    import tests.fault_models  # noqa: F401  (registers test-overflow)

    rng = np.random.default_rng(0)
    pixels = list(rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8))

    def embed(precision):
        spec = ModelSpec("test-overflow", device="cpu", precision=precision)
        return Embedder(spec).embed_pixels(pixels)

    half, exact = embed("fp16"), embed("fp32")
    assert np.isfinite(half).all()
    np.testing.assert_allclose(half, exact, rtol=1e-6)


def test_shards_of_earlier_versions_stay_valid():
    # The new fields are how a worker runs, not what the vectors are: adding
    # them must not orphan the shards that builds before them wrote.
    spec = ModelSpec()
    before = {
        "imgindex_version": spec.imgindex_version,
        "max_pixels": spec.max_pixels,
        "name": spec.name,
    }
    text = json.dumps(before, sort_keys=True)
    assert spec_key(spec) == hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    tuned = dataclasses.replace(
        spec, device="cuda", batch_size=256, decode_threads=12, precision="fp16"
    )
    assert spec_key(tuned) == spec_key(spec)


def test_partitions_are_gpu_sized_only_for_gpu_workers(client):
    from imgindex.pipeline.dispatch import DispatchSettings, PartitionDispatcher

    def size(c, spec, n=100_000, **settings):
        d = PartitionDispatcher(
            c, "x", "/", spec, DispatchSettings(**settings), lambda *a: None
        )
        return d.partition_size(n)

    assert size(client, ModelSpec()) == 32
    assert size(client, ModelSpec(device="cuda")) == 32 * GPU_BATCH_SIZE
    assert size(client, ModelSpec(device="cuda", batch_size=64)) == 32 * 64
    # Small jobs: 2 tasks for each of the 2 worker threads.
    assert size(client, ModelSpec(device="cuda"), n=1000) == 250
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            resources={"GPU": 1},
            dashboard_address=None,
            processes=False,
        ) as cluster,
        Client(cluster) as gpu_client,
    ):
        # Workers started as docs/guide/gpus.md says for GPU nodes (--resources GPU=1).
        assert size(gpu_client, ModelSpec()) == 32 * GPU_BATCH_SIZE
        assert size(gpu_client, ModelSpec(device="cpu")) == 32


def test_bad_settings_are_one_line_errors(tmp_path, dataset):
    out = tmp_path / "out"
    env = {**os.environ, "DASK_IMGINDEX__PRECISION": "fp8"}
    proc = subprocess.run(
        imgindex_cmd("build", dataset, "-o", out),
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "--precision 'fp8' is not one of auto, fp32, fp16, bf16" in one_error_line(
        proc.stderr
    )
    for key in ("decode-threads", "partition-size"):  # named by the key set
        with dask.config.set({f"imgindex.{key}": "many"}):
            result = invoke("build", dataset, "-o", out)
        assert result.exit_code == 2
        assert f"imgindex.{key} 'many' is not auto or a whole number >= 1" in (
            one_error_line(result.stderr)
        )
    with pytest.raises(ConfigError, match="--batch-size '0'"):
        ModelSpec.from_config(batch_size="0")
    assert not out.exists()


@pytest.mark.slow  # starts a cluster or a process
def test_doctor_times_a_batch_and_checks_the_precision():
    result = invoke("doctor", "--batch-size", "4", "--precision", "fp16", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    for w in report["workers"]:
        assert w["batch_size"] == 4 and w["precision"] == "fp16"
        assert w["batch_seconds"] > 0 and w["images_per_second"] > 0
        assert w["cosine_vs_fp32"] >= 0.999
        assert w["device"] == "cpu" and "gpu" not in w
    text = invoke("doctor", "--batch-size", "2").stdout
    assert "batch of 2 in" in text and "fp32, 1 decode threads" in text


def test_a_batch_too_big_for_the_gpu_runs_in_halves(caplog):
    import tests.fault_models  # noqa: F401  (registers test-oom)

    rng = np.random.default_rng(1)
    pixels = list(rng.integers(0, 256, (7, 224, 224, 3), dtype=np.uint8))
    embedder = Embedder(ModelSpec("test-oom", device="cpu", batch_size=7))
    with caplog.at_level("WARNING", logger="imgindex.pipeline.embed"):
        whole = embedder.embed_pixels(pixels)  # 7 -> 3 + 4 -> 1 + 2 + 2 + 2
    # Each split says so, and how to avoid it.
    told = [r.getMessage() for r in caplog.records if "out of GPU memory" in r.msg]
    assert [int(m.split("batch of ")[1].split(";")[0]) for m in told] == [7, 3, 4]
    assert all("a smaller --batch-size avoids the retry" in m for m in told)
    one_by_one = np.concatenate([embedder.embed_pixels([p]) for p in pixels])
    np.testing.assert_allclose(whole, one_by_one, rtol=1e-6)


def test_a_build_with_gpu_settings_on_cpu_workers_indexes_the_same(
    client, dataset, tmp_path
):
    # The threaded path inside real Dask worker processes, bad files included:
    # the same images indexed, the same failures, the same vectors.
    from imgindex.pipeline.build import run_build
    from tests.conftest import write_bad_files

    bad = write_bad_files(dataset)
    plain = run_build(client, dataset, tmp_path / "plain", spec=ModelSpec(device="cpu"))
    tuned_spec = ModelSpec(device="cpu", batch_size=6, decode_threads=2)
    tuned = run_build(client, dataset, tmp_path / "tuned", spec=tuned_spec)
    assert tuned.indexed == plain.indexed > 0
    assert {f["path"] for f in tuned.failed} == {f["path"] for f in plain.failed}
    assert {f["path"] for f in tuned.failed} == set(bad)
    assert "decode-wait" in tuned.task_seconds
    a = read_index(tmp_path / "plain" / "beach")
    b = read_index(tmp_path / "tuned" / "beach")
    ids = np.array(sorted(r.id for r in a.manifest))
    assert np.array_equal(ids, np.array(sorted(r.id for r in b.manifest)))
    cosine = np.sum(a.index.reconstruct_batch(ids) * b.index.reconstruct_batch(ids), 1)
    assert cosine.min() > 0.99999
