import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgindex.pipeline.decode import decode_image
from imgindex.pipeline.errors import DecodeError
from tests.conftest import write_bad_files


def test_output_shape_and_type(tmp_path: Path):
    p = tmp_path / "a.jpg"
    Image.new("RGB", (640, 480), (10, 200, 30)).save(p)
    out = decode_image(p)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert abs(int(out[..., 1].mean()) - 200) <= 2


@pytest.mark.parametrize(
    "name", ["empty.jpg", "truncated.jpg", "random.jpg", "text.png"]
)
def test_bad_files_raise_decode_error_with_reason(tmp_path: Path, name: str):
    expected = write_bad_files(tmp_path)
    with pytest.raises(DecodeError) as info:
        decode_image(tmp_path / name)
    assert expected[name] in info.value.reason
    assert "\n" not in info.value.reason


def test_heif_and_avif_photos_decode_as_their_jpeg(tmp_path: Path):
    """What phones write (HEIC) and the web's newer format (AVIF) give the
    model what the same photo as a JPEG does, upright where EXIF turns it.

    (A HEIF is turned by its own rotation box, which libheif applies;
    pillow-heif resets its EXIF orientation on opening, as the HEIF standard
    has viewers ignore it, and writes no rotation box: so only an upright
    HEIF is compared.)"""
    from skimage import data

    from imgindex.pipeline.batch_decode import BatchDecoder

    def turned() -> Image.Exif:  # a new one each time: a save may take its tag
        exif = Image.Exif()
        exif[0x0112] = 6  # shown turned a quarter clockwise
        return exif

    photo = Image.fromarray(data.astronaut())
    for suffix, kind in ((".jpg", "JPEG"), (".heic", "HEIF"), (".avif", "AVIF")):
        photo.save(tmp_path / f"photo{suffix}", kind, quality=92)
    for suffix, kind in ((".jpg", "JPEG"), (".avif", "AVIF")):
        photo.save(tmp_path / f"turned{suffix}", kind, quality=92, exif=turned())
    jpeg = decode_image(tmp_path / "photo.jpg")
    upright = decode_image(tmp_path / "turned.jpg")
    assert np.abs(jpeg.astype(int) - upright).mean() > 30  # the turn shows
    for name, expected in (
        ("photo.heic", jpeg),
        ("photo.avif", jpeg),
        ("turned.avif", upright),
    ):
        ours = decode_image(tmp_path / name)
        assert np.abs(ours.astype(int) - expected).mean() < 3, name
    # A GPU worker's batch decoder hands them to the CPU path.
    names = ["photo.heic", "turned.avif"]
    decoder = BatchDecoder("cpu", threads=2)
    batch = decoder.decode(decoder.start_reads(str(tmp_path), names))
    assert (batch.paths, batch.failures, batch.n_batched) == (names, [], 0)
    for got, name in zip(batch.pixels.numpy(), names, strict=True):
        assert np.array_equal(got, decode_image(tmp_path / name))


def test_a_heif_photo_without_its_reader_names_the_extra(tmp_path: Path):
    from skimage import data

    Image.fromarray(data.astronaut()).save(tmp_path / "IMG_0001.HEIC", "HEIF")
    # A worker without the `heif` extra: pillow_heif cannot be imported there.
    code = (
        "import sys; sys.modules['pillow_heif'] = None\n"
        "from imgindex.pipeline.decode import HEIF_READER, decode_image\n"
        "from imgindex.pipeline.errors import DecodeError\n"
        "assert not HEIF_READER\n"
        "try:\n"
        f"    decode_image({str(tmp_path / 'IMG_0001.HEIC')!r})\n"
        "except DecodeError as e:\n"
        "    print(e.reason)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == (
        "a HEIF image, and pillow-heif is not installed where it was read: "
        "pip install 'imgindex[heif]' on the workers"
    )
