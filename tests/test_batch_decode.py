"""The batch decoder (pipeline/batch_decode.py) against the CPU path it stands in for.

On a GPU the batch decoder is nvJPEG; here it is OpenCV in threads, which
goes through the same header checks, batching, draft-mode reduction,
orientation, resampling, traits, retries and CPU fallback. Every image is
real: photos written by Pillow in each form a collection holds.
"""

from __future__ import annotations

import glob
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from imgindex.pipeline.batch_decode import BatchDecodeFeed, BatchDecoder, upright
from imgindex.pipeline.decode import center_crop, input_and_traits, load_rgb
from imgindex.pipeline.errors import DecodeError
from imgindex.pipeline.jpeg import read_header
from imgindex.pipeline.synthetic import write_kinds
from imgindex.pipeline.traits import hash_distance
from tests.conftest import write_bad_files
from tests.helpers import invoke, read_index

_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict[str, Path]:
    """Photos of every kind the two paths must agree on, 90-1,500 px."""
    return write_kinds(tmp_path_factory.mktemp("kinds"))


def _cpu_path(path: Path):
    return input_and_traits(load_rgb(str(path)), str(path))


def test_headers_say_what_each_file_is(kinds):
    def header(name):
        return read_header(kinds[name].read_bytes())

    plain = header("plain0.jpg")
    assert (plain.width, plain.height, plain.components) == (1200, 800, 3)
    assert plain.plain() and plain.orientation == 1
    for orientation in range(2, 9):
        assert header(f"orientation{orientation}.jpg").orientation == orientation
    assert not header("progressive.jpg").sequential
    assert not header("progressive.jpg").plain()
    assert header("cmyk.jpg").components == 4 and not header("cmyk.jpg").plain()
    assert header("grey.jpg").components == 1 and header("grey.jpg").plain()
    assert header("alpha.png") is None
    data = kinds["plain1.jpg"].read_bytes()
    assert not read_header(data[: len(data) // 2]).complete
    assert read_header(data[:20]) is None
    assert read_header(b"") is None


def test_resampling_gives_pillows_pixels(kinds):
    from imgindex.pipeline.resample import BOX, grey, resample_spans

    rng = np.random.default_rng(3)
    images = [np.asarray(Image.open(kinds["plain0.jpg"]))]
    images.append(rng.integers(0, 256, (301, 517, 3), dtype=np.uint8))
    for array in images:
        h, w = array.shape[:2]
        side = min(w, h) * 224 / 256
        spans = [
            torch.tensor([v], dtype=torch.float64)
            for v in ((h - side) / 2, (w - side) / 2, side, side)
        ]
        sizes = torch.tensor([float(h)]), torch.tensor([float(w)])
        canvas = torch.from_numpy(array.copy())[None]
        ours = resample_spans(canvas, *sizes, spans, 224)[0].numpy()
        pillows = center_crop(Image.fromarray(array), 256, 224)
        assert np.abs(ours.astype(int) - pillows).max() <= 1
        assert np.mean(ours != pillows) < 0.01
        level = grey(canvas)[0].numpy()
        pillow_grey = Image.fromarray(array).convert("L")
        assert np.array_equal(level, np.asarray(pillow_grey))
        whole = [torch.tensor([v], dtype=torch.float64) for v in (0, 0, h, w)]
        thumb = resample_spans(
            torch.from_numpy(level)[None, ..., None], *sizes, whole, 32, BOX
        )
        pillow_thumb = np.asarray(pillow_grey.resize((32, 32), Image.Resampling.BOX))
        assert np.abs(thumb[0, ..., 0].numpy().astype(int) - pillow_thumb).max() <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_turns_as_pillow_does(orientation):
    array = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    im = Image.fromarray(array)
    exif = im.getexif()
    exif[_ORIENTATION] = orientation
    buffer = io.BytesIO()
    im.save(buffer, "PNG", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(buffer)))
    ours = upright(torch.from_numpy(array), orientation).numpy()
    assert np.array_equal(ours, expected)


def test_every_kind_gives_the_cpu_paths_input_and_traits(kinds):
    from imgindex.pipeline.embed import Embedder, ModelSpec

    root = str(next(iter(kinds.values())).parent)
    names = sorted(kinds)
    decoder = BatchDecoder("cpu", threads=2)
    batch = decoder.decode(decoder.start_reads(root, names))
    assert batch.paths == names and not batch.failures
    # Plain JPEGs in the batch decoder; progressive, CMYK, PNG on the CPU path.
    plain = [
        n
        for n in names
        if n.endswith(".jpg") and n not in ("progressive.jpg", "cmyk.jpg")
    ]
    assert batch.n_batched == len(plain)

    expected = [_cpu_path(kinds[n]) for n in names]
    pixels = np.stack([e[0] for e in expected])
    traits = np.stack([e[1] for e in expected])
    embedder = Embedder(ModelSpec(device="cpu"))
    ours = embedder.embed_pixels(batch.pixels.numpy())
    cpu = embedder.embed_pixels(pixels)
    cosine = (ours * cpu).sum(axis=1)
    assert cosine.min() >= 0.995, dict(zip(names, cosine.round(4), strict=True))
    on_cpu = [i for i, n in enumerate(names) if n not in plain]
    assert np.array_equal(batch.pixels.numpy()[on_cpu], pixels[on_cpu])

    for field in ("content", "digest", "width", "height"):
        assert np.array_equal(batch.traits[field], traits[field]), field
    assert hash_distance(batch.traits, traits).max() <= 4
    np.testing.assert_allclose(batch.traits["brightness"], traits["brightness"], atol=1)
    np.testing.assert_allclose(batch.traits["contrast"], traits["contrast"], atol=1)
    np.testing.assert_allclose(
        batch.traits["sharpness"], traits["sharpness"], rtol=0.05
    )


def test_bad_files_fail_alone_with_the_cpu_paths_reasons(tmp_path, kinds):
    expected = write_bad_files(tmp_path)
    os.remove(tmp_path / "broken_link.jpg")  # discovery reports those
    del expected["broken_link.jpg"]
    good = kinds["plain0.jpg"].read_bytes()
    # A header the batch decoder takes, with a frame no decoder can decode.
    (tmp_path / "bogus_sampling.jpg").write_bytes(_with_bogus_sampling(good))
    for n in range(3):
        (tmp_path / f"good{n}.jpg").write_bytes(good)
    names = sorted(p.name for p in tmp_path.iterdir())
    decoder = BatchDecoder("cpu", threads=2)
    batch = decoder.decode(decoder.start_reads(str(tmp_path), names))

    reasons = {f.path: f.reason for f in batch.failures}
    assert set(reasons) == {*expected, "bogus_sampling.jpg"}
    for name, fragment in expected.items():
        assert fragment in reasons[name]
    with pytest.raises(DecodeError) as cpu:
        load_rgb(str(tmp_path / "bogus_sampling.jpg"))
    assert reasons["bogus_sampling.jpg"] == cpu.value.reason
    assert batch.paths == ["good0.jpg", "good1.jpg", "good2.jpg", "good_ref.jpg"]
    # The failed batch was retried image by image: the good JPEGs stayed in it.
    assert batch.n_batched == 4


def _with_bogus_sampling(jpeg: bytes) -> bytes:
    """``jpeg`` with its first component's sampling factors set to 0."""
    out = bytearray(jpeg)
    pos = 2
    while out[pos + 1] != 0xC0:  # SOF0
        pos += 2 + int.from_bytes(out[pos + 2 : pos + 4], "big")
    out[pos + 11] = 0
    return bytes(out)


def test_budgets_split_batches_without_changing_results(kinds):
    root = str(next(iter(kinds.values())).parent)
    names = sorted(n for n in kinds if n.endswith(".jpg"))
    whole = BatchDecoder("cpu", threads=2)
    first = whole.decode(whole.start_reads(root, names))
    # A decode call of ~1 megapixel, and 1-megapixel images on the CPU path.
    small = BatchDecoder("cpu", threads=2, batch_pixels=1 << 20, huge_pixels=1 << 20)
    second = small.decode(small.start_reads(root, names))
    assert second.paths == first.paths
    assert second.n_batched < first.n_batched
    large = [n for n in names if read_header(kinds[n].read_bytes()).pixels > 1 << 20]
    assert large and second.n_batched == first.n_batched - len(large)
    keep = [i for i, n in enumerate(names) if n not in large]
    assert torch.equal(second.pixels[keep], first.pixels[keep])


def test_the_feed_yields_batches_in_order_and_stops_early(kinds):
    root = str(next(iter(kinds.values())).parent)
    names = sorted(kinds) * 2
    decoder = BatchDecoder("cpu", threads=2)
    batches = list(BatchDecodeFeed(decoder, root, names, batch_size=7))
    full, rest = divmod(len(names), 7)
    assert [len(b.paths) for b in batches] == [7] * full + [rest] * (rest > 0)
    assert [p for b in batches for p in b.paths] == names
    assert all(len(b.traits) == len(b.paths) == len(b.pixels) for b in batches)
    for _ in BatchDecodeFeed(decoder, root, names, batch_size=2):
        break  # the producer thread must stop, not hang the test


@pytest.mark.slow  # two builds, each on a LocalCluster
def test_a_build_with_the_batch_decoder_matches_the_cpu_path(tmp_path, kinds):
    from imgindex.pipeline.embed import Embedder, ModelSpec

    root = next(iter(kinds.values())).parent
    runs = {}
    for decoder in ("batch", "pillow"):
        out = tmp_path / decoder
        run = invoke("build", root, "-o", out, "--decoder", decoder, "--json")
        assert run.exit_code == 0, run.stderr
        stored = read_index(out / root.name)
        vectors = {r.path: stored.index.reconstruct(r.id) for r in stored.manifest}
        shards = glob.glob(str(out / root.name / "shards" / "*.npz"))
        traits = {}
        for shard in shards:
            with np.load(shard) as data:
                traits.update(zip(data["ids"].tolist(), data["traits"], strict=True))
        runs[decoder] = (vectors, {r.path: traits[r.id] for r in stored.manifest})
    (batch_vectors, batch_traits), (cpu_vectors, cpu_traits) = (
        runs["batch"],
        runs["pillow"],
    )
    assert set(batch_vectors) == set(cpu_vectors) == set(kinds)
    for path in kinds:
        assert float(batch_vectors[path] @ cpu_vectors[path]) >= 0.995, path
        for field in ("content", "digest"):
            assert batch_traits[path][field] == cpu_traits[path][field], path
        assert cpu_traits[path]["digest"] != 0, path
    embedder = Embedder(ModelSpec(device="cpu"))
    direct = embedder.embed_pixels([embedder.decode(str(kinds["cmyk.jpg"]))])[0]
    np.testing.assert_allclose(batch_vectors["cmyk.jpg"], direct, atol=1e-4)
