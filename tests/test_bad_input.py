"""Every kind of bad or unusual file: skipped with a reason, or indexed correctly."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgindex.pipeline.build import run_build
from imgindex.pipeline.discover import ImageRecord
from imgindex.pipeline.embed import Embedder, ModelSpec, embed_partition
from tests.conftest import write_bad_files
from tests.helpers import read_index


def photo(seed: int = 3, size=(480, 360)) -> Image.Image:
    from imgindex.pipeline.synthetic import synthetic_photo

    return synthetic_photo(np.random.default_rng(seed), *size)


def header_only_png(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height but holds a few bytes of pixels.

    Decoding it would fail as truncated, so a "too large" reason proves that
    the size was checked from the header, before decoding.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat))


def exif_rotated(src: Image.Image, path: Path) -> None:
    """Store the pixels turned 90 degrees, with EXIF orientation 6 to turn them back."""
    stored = src.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    stored.save(path, exif=exif, quality=95)


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, dict[str, str], list[str]]:
    """Every case in one dataset: (root, failing name -> reason, good names)."""
    root = tmp_path / "corpus"
    failing = write_bad_files(root)
    base = photo()
    base.save(root / "plain.jpg", quality=95)
    arr16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(arr16).save(root / "sixteen_bit.png")
    base.convert("CMYK").save(root / "cmyk.jpg", quality=95)
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.info["transparency"] = 0
    pal.save(root / "palette_transparent.png", transparency=0)
    base.convert("L").save(root / "gray.jpg")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(root / "one_pixel.png")
    exif_rotated(base, root / "rotated.jpg")
    (root / "folder.jpg").mkdir()
    base.save(root / "folder.jpg" / "inside.jpg")
    base.save(root / os.fsdecode(b"caf\xe9-latin1.jpg"))
    base.save(root / "saved.jfif", "JPEG", quality=95)  # as Windows browsers name them
    base.save(root / "slide.jp2", quality_mode="dB", quality_layers=[45])
    header_only_png(root / "bomb.png", 30000, 30000)
    failing["bomb.png"] = "over the limit"
    os.mkfifo(root / "pipe.jpg")
    failing["pipe.jpg"] = "not a regular file"
    good = [
        "good_ref.jpg",
        "plain.jpg",
        "sixteen_bit.png",
        "cmyk.jpg",
        "palette_transparent.png",
        "gray.jpg",
        "one_pixel.png",
        "rotated.jpg",
        "folder.jpg/inside.jpg",
        os.fsdecode(b"caf\xe9-latin1.jpg"),
        "saved.jfif",
        "slide.jp2",
    ]
    return root, failing, good


def test_build_skips_bad_files_and_indexes_the_rest(client, corpus, tmp_path):
    root, failing, good = corpus
    summary = run_build(client, root, tmp_path / "out", partition_size=4)
    reasons = {f["path"]: f["reason"] for f in summary.failed}
    assert set(reasons) == set(failing)
    for name, fragment in failing.items():
        assert fragment in reasons[name], (name, reasons[name])
        assert "\n" not in reasons[name]
    stored = read_index(tmp_path / "out" / "corpus")
    assert sorted(r.path for r in stored.manifest) == sorted(good)
    assert {f.path for f in stored.failures} == set(failing)
    assert stored.index.ntotal == len(good)


def test_a_dataset_of_bad_files_alone_gives_an_empty_index_that_says_so(
    client, tmp_path
):
    """Every file failed: the index holds none, its failures are listed, and
    a search says so rather than print bare query names."""
    import json

    from tests.helpers import invoke

    root = tmp_path / "bad"
    failing = write_bad_files(root)
    (root / "good_ref.jpg").unlink()
    summary = run_build(client, root, tmp_path / "out")
    assert summary.indexed == 0 and len(summary.failed) == len(failing)
    index_dir = tmp_path / "out" / "bad"
    query = tmp_path / "query.jpg"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(query)
    shown = invoke("search", index_dir, query)
    assert shown.exit_code == 0, shown.stderr
    assert shown.stdout.splitlines() == [f"{query}:", "  no hits"]
    assert "the index holds no images" in shown.stderr
    as_json = invoke("search", index_dir, query, "--json")
    assert json.loads(as_json.stdout) == [[]]
    info = invoke("info", index_dir, "--json")
    assert json.loads(info.stdout)["count"] == 0


def embed(path: Path) -> np.ndarray:
    e = Embedder(ModelSpec(device="cpu"))
    return e.embed_pixels([e.decode(str(path))])[0]


def test_unusual_modes_embed_like_the_plain_image(corpus, tmp_path):
    root, _, _ = corpus
    photo().convert("L").save(tmp_path / "gray8.png")
    gray = embed(tmp_path / "gray8.png")
    assert float(embed(root / "sixteen_bit.png") @ gray) > 0.99  # rescaled, not clipped
    plain = embed(root / "plain.jpg")
    assert float(embed(root / "cmyk.jpg") @ plain) > 0.9
    assert float(embed(root / "rotated.jpg") @ plain) > 0.98  # indexed upright
    assert float(embed(root / "saved.jfif") @ plain) > 0.999
    assert float(embed(root / "slide.jp2") @ plain) > 0.98  # JPEG 2000, lossy


def test_rotation_is_really_applied(corpus, tmp_path):
    root, _, _ = corpus
    with Image.open(root / "rotated.jpg") as im:
        im.getexif().clear()
        bare = tmp_path / "no_exif.jpg"
        im.save(bare, quality=95)
    plain = embed(root / "plain.jpg")
    assert (
        float(embed(bare) @ plain) < float(embed(root / "rotated.jpg") @ plain) - 0.05
    )


def test_transparency_is_composited_on_white(tmp_path):
    from imgindex.pipeline.decode import decode_image

    im = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    im.save(tmp_path / "clear.png")
    assert decode_image(tmp_path / "clear.png").min() == 255


def test_bomb_is_rejected_from_its_header(tmp_path):
    from imgindex.pipeline.decode import decode_image
    from imgindex.pipeline.errors import DecodeError

    header_only_png(tmp_path / "b.png", 12000, 12000)  # 144 M pixels > 89 M
    with pytest.raises(
        DecodeError, match="12000x12000 = 144000000 pixels, over the limit"
    ):
        decode_image(tmp_path / "b.png")


def test_file_deleted_after_discovery_is_a_failure_row(dataset):
    (dataset / "img00004.jpg").unlink()
    records = [ImageRecord("img00003.jpg", 1, 1), ImageRecord("img00004.jpg", 1, 1)]
    result = embed_partition(str(dataset), records, ModelSpec(device="cpu"))
    assert result.paths == ["img00003.jpg"]
    assert [(f.path, f.reason) for f in result.failures] == [
        ("img00004.jpg", "file not found (deleted after discovery?)")
    ]
    assert result.vectors.shape == (1, 1280)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX fork")
def test_unreadable_file_is_reported(tmp_path):
    """Root reads anything, so the decode runs in a child that drops to nobody."""
    import warnings

    from imgindex.pipeline.decode import decode_image
    from imgindex.pipeline.errors import DecodeError

    folder = Path(tempfile.mkdtemp(prefix="imgindex-perm-"))
    try:
        os.chmod(folder, 0o755)
        photo().save(folder / "secret.jpg")
        os.chmod(folder / "secret.jpg", 0o000)
        read_end, write_end = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
            pid = os.fork()
        if pid == 0:  # child: no pytest machinery, just report and exit
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                decode_image(folder / "secret.jpg")
                message = "decoded"
            except DecodeError as e:
                message = e.reason
            except BaseException as e:
                message = f"unexpected {type(e).__name__}: {e}"
            os.write(write_end, message.encode())
            os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        with os.fdopen(read_end) as f:
            assert f.read() == "permission denied"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
