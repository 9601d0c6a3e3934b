"""Embeddings as shards written by the workers (issue 9), on real clusters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from imgindex.pipeline.build import run_build
from imgindex.pipeline.discover import ImageRecord, discover_images
from imgindex.pipeline.dispatch import DispatchSettings, PartitionDispatcher
from imgindex.pipeline.embed import ModelSpec
from imgindex.pipeline.shards import iter_shards, read_shard, staging_dir
from imgindex.pipeline.store import SHARDS_DIR
from tests.helpers import can_mount_privately, imgindex_cmd, invoke, read_index


def vectors_by_id(index_dir: Path) -> dict[int, np.ndarray]:
    stored = read_index(index_dir)
    ids = np.array([r.id for r in stored.manifest], np.int64)
    return dict(zip(ids.tolist(), stored.index.reconstruct_batch(ids), strict=True))


@pytest.mark.slow
def test_tasks_return_counts_not_vectors(process_cluster, dataset, tmp_path):
    from distributed import Client

    records = list(discover_images(dataset))[:12]
    shard_dir = tmp_path / "staging"
    shard_dir.mkdir()
    returned = []
    with Client(process_cluster, set_as_default=False) as client:
        dispatcher = PartitionDispatcher(
            client, "beach", str(dataset), ModelSpec(device="cpu"),
            DispatchSettings(), lambda part, result: returned.append(result),
            shard_dir=str(shard_dir),
        )  # fmt: skip
        dispatcher.run([records[:6], records[6:]])
    assert len(returned) == 2
    for result in returned:
        # nothing but counts, failures, timings and the shard's name came back
        assert result.vectors.size == 0 and result.ids.size == 0
        assert result.paths == [] and result.failures == []
        assert result.n_embedded == 6 and result.shard
        shard = read_shard(shard_dir / result.shard)
        ids, vectors = shard.arrays()
        assert vectors.shape == (6, 1280) and vectors.dtype == np.float32
        assert len(set(ids.tolist())) == 6
        assert shard.info["worker"] == result.worker  # written by that worker
        # and says which preprocessing made them (a client refuses another)
        assert shard.info["preprocess"]["crop"] == 224
    # readable without imgindex, with numpy alone; together the two shards
    # hold every image of the two partitions once
    paths = []
    for result in returned:
        with np.load(shard_dir / result.shard) as data:
            assert set(data.files) == {"ids", "vectors", "info", "traits"}
            paths += json.loads(data["info"].tobytes())["paths"]
    assert sorted(paths) == sorted(r.path for r in records)


def test_index_keeps_its_shards_and_reindex_gives_the_same_index(
    client, dataset, tmp_path
):
    out = tmp_path / "out"
    summary = run_build(client, dataset, out, partition_size=8)
    assert summary.vectors == "written by workers"
    index_dir = out / "beach"
    shards = list(iter_shards(index_dir / SHARDS_DIR))
    assert len(shards) == summary.shards == summary.partitions
    assert sum(len(s.info["paths"]) for s in shards) == 36
    assert not staging_dir(index_dir).exists()
    before = vectors_by_id(index_dir)
    result = invoke("reindex", index_dir, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["count"] == 36
    after = vectors_by_id(index_dir)
    assert before.keys() == after.keys()
    for i, v in before.items():
        np.testing.assert_array_equal(v, after[i])
    info = json.loads(invoke("info", index_dir, "--json").stdout)
    assert info["shards"]["count"] == len(shards)
    assert info["shards"]["dtype"] == "float32"
    assert info["shards"]["bytes"] > 36 * 1280 * 4


def test_incremental_build_over_shards_then_reindex(client, dataset, tmp_path):
    out = tmp_path / "out"
    run_build(client, dataset, out, partition_size=8)
    (dataset / "img00001.jpg").unlink()  # removed
    shutil.copy(dataset / "img00002.jpg", dataset / "new.jpg")  # added
    changed = dataset / "img00003.jpg"
    changed.write_bytes((dataset / "img00004.jpg").read_bytes())
    os.utime(dataset / "img00005.jpg", ns=(1, 1))  # touched: the same bytes
    summary = run_build(client, dataset, out, partition_size=8)
    assert (summary.added, summary.updated, summary.removed) == (1, 1, 1)
    assert (summary.touched, summary.unchanged) == (1, 34)
    assert summary.embedded == 2
    built = vectors_by_id(out / "beach")
    assert len(built) == 36
    assert invoke("reindex", out / "beach").exit_code == 0
    rebuilt = vectors_by_id(out / "beach")
    assert built.keys() == rebuilt.keys()
    for i, v in built.items():
        np.testing.assert_allclose(v, rebuilt[i], atol=1e-6)
    paths = {r.path for r in read_index(out / "beach").manifest}
    assert "img00001.jpg" not in paths and "new.jpg" in paths


def test_damaged_shard_is_re_embedded_never_indexed(client, dataset, tmp_path):
    out = tmp_path / "out"
    reference = run_build(client, dataset, tmp_path / "ref", partition_size=6)
    # An interrupted build leaves finished shards in the staging folder; one
    # of them truncated (a node died while the file system flushed it), and a
    # temporary file a worker killed mid-write left behind.
    staging = staging_dir(out / "beach")
    staging.mkdir(parents=True)
    for shard in sorted((tmp_path / "ref" / "beach" / SHARDS_DIR).iterdir())[:3]:
        shutil.copy(shard, staging / shard.name)
    victim = sorted(staging.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    (staging / ".abc.npz.tmp-4242").write_bytes(b"half a shard")
    summary = run_build(client, dataset, out, partition_size=6)
    assert summary.damaged_shards == [victim.name]
    assert summary.resumed_partitions == 2
    assert summary.resumed_images == 12
    assert summary.embedded == 24 and summary.indexed == 36
    assert not staging.exists()  # the leftovers were ours and are gone
    assert reference.indexed == 36
    ref = vectors_by_id(tmp_path / "ref" / "beach")
    got = vectors_by_id(out / "beach")
    assert ref.keys() == got.keys()
    for i, v in ref.items():
        np.testing.assert_allclose(v, got[i], atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not can_mount_privately(), reason="needs root for mounts")
def test_worker_that_cannot_see_out_gets_vectors_streamed(
    dask_processes, dataset, tmp_path
):
    # The honest stand-in for "no shared file system": a real `dask worker` in
    # its own mount namespace, where --out is an empty tmpfs of its own. It
    # reads the dataset like any worker, but what it writes under --out the
    # client never sees, so the probe must notice and the vectors come back.
    out = tmp_path / "out"
    out.mkdir()
    address = dask_processes.start_scheduler()
    worker = " ".join(
        [dask_processes.dask, "worker", address, "--nthreads", "1", "--host",
         "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]
    )  # fmt: skip
    dask_processes._spawn(
        ["unshare", "-m", "sh", "-c",
         f"mount -t tmpfs tmpfs '{out}' && exec {worker}"],
        "isolated-worker",
    )  # fmt: skip
    dask_processes.wait_for_workers(1)
    result = subprocess.run(
        imgindex_cmd("build", dataset, "--out", out, "--json", "--scheduler", address),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "vectors: streamed to the client: 1 worker(s) cannot write" in (
        result.stderr
    )
    (summary,) = json.loads(result.stdout)["datasets"]
    assert summary["vectors"] == "streamed to client"
    assert summary["indexed"] == 36
    assert len(list(iter_shards(out / "beach" / SHARDS_DIR))) == summary["shards"]


def test_a_shard_made_by_another_copy_of_the_model_is_refused(tmp_path):
    """A worker that joins with another version of the model's package (its
    preprocessing differs) is caught at its first shard, not averaged in."""
    import dataclasses
    from types import SimpleNamespace

    from imgindex.pipeline.build import _ShardSink
    from imgindex.pipeline.embed import PartitionResult
    from imgindex.pipeline.errors import BuildFailed
    from imgindex.pipeline.models import ModelCard, Preprocess
    from imgindex.pipeline.shards import write_shard

    records = [ImageRecord("a.jpg", 1, 1), ImageRecord("b.jpg", 1, 1)]

    def shard_from(preprocess: Preprocess, worker: str):
        result = PartitionResult(
            ids=np.array([r.id for r in records]),
            paths=[r.path for r in records],
            vectors=np.eye(2, 8, dtype=np.float32),
            failures=[],
            worker=worker,
            preprocess=dataclasses.asdict(preprocess),
        )
        name = write_shard(tmp_path, ModelSpec(), records, result)
        return result, read_shard(tmp_path / name)

    ours = Preprocess()
    sink = _ShardSink(
        SimpleNamespace(kept=[], known_failures=[]),
        ModelCard("m", 8, ours),
        tmp_path / "plan",
    )
    sink.add(*shard_from(ours, "tcp://10.0.0.1:1"))
    assert sink.embedded == 2
    with pytest.raises(
        BuildFailed,
        match=r"from worker tcp://10\.0\.0\.2:1 was made "
        r"with preprocessing .*'crop': 256.*, expected .*'crop': 224",
    ):
        sink.add(*shard_from(Preprocess(resize=288, crop=256), "tcp://10.0.0.2:1"))


@pytest.mark.parametrize(
    "size", [0, 1, 65_535, 65_536, 65_537, 131_073, (1 << 20) + 1, 3 * (1 << 20) + 5]
)
def test_a_files_hashes_read_in_blocks_equal_those_of_its_bytes(size, tmp_path):
    """The CPU path hashes a file by path, in blocks; the batch path and
    tar members hash bytes: they must agree at every size around the 64 KiB
    samples and the 1 MiB blocks, or a touched file would look changed."""
    from imgindex.pipeline.traits import file_hashes, file_hashes_of

    data = np.random.default_rng(size).integers(0, 256, size, np.uint8).tobytes()
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    hashes = file_hashes(path)
    assert hashes == file_hashes_of(data)
    assert hashes.digest != 0
    if size > 2 * 65_536:  # a byte between the samples: only the digest sees it
        middle = bytearray(data)
        middle[size // 2] ^= 1
        edited = file_hashes_of(bytes(middle))
        assert edited.content == hashes.content and edited.digest != hashes.digest


def test_traits_of_shards_from_before_the_digest_read_with_digest_0(tmp_path):
    from imgindex.pipeline.shards import load_traits
    from imgindex.pipeline.traits import TRAITS

    # The layout as imgindex wrote it before the digest, spelled out.
    before = [("content", "<u8"), ("width", "<u4"), ("height", "<u4")]
    before += [("hashes", "<u8", (8,)), ("brightness", "<f4"), ("contrast", "<f4")]
    old = np.zeros(3, np.dtype([*before, ("sharpness", "<f4")]))
    old["content"], old["width"], old["sharpness"] = [7, 8, 9], 640, 1.5
    old["hashes"][:, 2] = 11
    np.savez(tmp_path / "old.npz", traits=old)
    read = load_traits(tmp_path / "old.npz")
    assert read.dtype == TRAITS and read["digest"].tolist() == [0, 0, 0]
    for name in old.dtype.names:
        np.testing.assert_array_equal(read[name], old[name])
    np.savez(tmp_path / "other.npz", traits=np.zeros(3, [("content", "<u8")]))
    assert load_traits(tmp_path / "other.npz") is None


def test_touched_shards_claim_each_image_once():
    from imgindex.pipeline.touched import Restamped, claimed_once

    a, b, c = Path("a.npz"), Path("b.npz"), Path("c.npz")
    written = [
        (a, Restamped(a.name, np.array([5, 9]))),
        (b, Restamped(b.name, np.array([3]))),
        (c, Restamped(c.name, np.array([9, 4]))),
    ]
    use, drop = claimed_once(written)
    assert [p for p, _ in use] == [a, b] and [p for p, _ in drop] == [c]
    assert claimed_once(written[:2]) == (written[:2], [])
