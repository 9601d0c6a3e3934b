"""Read one image file into the model's input pixels, or raise DecodeError."""

from __future__ import annotations

import errno
import io
import os
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from imgindex.pipeline.discover import HEIF_EXTENSIONS
from imgindex.pipeline.traits import FileHashes

if TYPE_CHECKING:
    from imgindex.pipeline.errors import DecodeError

# Our own header-based check (below) replaces Pillow's global bomb limit: it is
# per call, configurable, and never emits a warning that tests or workers would
# have to filter from several threads at once.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

try:  # HEIF/HEIC, phone cameras' format: the `heif` extra (libheif's wheel)
    from pillow_heif import register_heif_opener
except ImportError:
    HEIF_READER = False
else:
    # HDR photos (10-bit) become 8-bit, as every other image here; the
    # rotation a HEIF stores is applied on opening, and its EXIF orientation
    # reset, so exif_transpose below does not turn it twice.
    register_heif_opener()
    HEIF_READER = True

_WHITE = (255, 255, 255)
_ORIENTATION = 0x0112  # EXIF tag
_QUARTER_TURNS = {5, 6, 7, 8}  # orientations that swap width and height
ORIGINAL_SIZE = "imgindex_original_size"  # key in a loaded image's .info


def decode_image(
    path: str | os.PathLike | BinaryIO,
    resize: int = 256,
    crop: int = 224,
    max_pixels: int = 89_478_485,
) -> np.ndarray:
    """Decode ``path`` into a ``crop`` x ``crop`` x 3 uint8 RGB array.

    The shorter side is scaled to ``resize`` and the centre ``crop`` square
    kept (:func:`center_crop`) after :func:`load_rgb`.

    Raises
    ------
    DecodeError
        With a one-line reason, for anything that is not a usable image.
    """
    return center_crop(load_rgb(path, resize, max_pixels), resize, crop)


def load_rgb(
    path: str | os.PathLike | BinaryIO,
    resize: int = 256,
    max_pixels: int = 89_478_485,
) -> Image.Image:
    """Open ``path`` as upright 8-bit RGB whose shorter side still covers ``resize``.

    ``path`` may also be an open binary file (an upload); errors then name
    its ``name`` attribute, or "uploaded image".

    EXIF orientation is applied, transparency is composited on white, 16-bit
    and float images are rescaled rather than clipped, and JPEGs are decoded
    at reduced size (draft mode) when that still covers ``resize``; images
    over ``max_pixels`` are rejected from their header, never decoded.

    Raises
    ------
    DecodeError
        With a one-line reason, for anything that is not a usable image.
    """
    from imgindex.pipeline.errors import DecodeError

    spath = _label(path)
    try:
        with Image.open(path if isinstance(path, io.IOBase) else spath) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise DecodeError(
                    spath,
                    f"image is {w}x{h} = {w * h} pixels, over the limit of "
                    f"{max_pixels} (imgindex.max-image-pixels); not decoded",
                )
            if w < 1 or h < 1:
                raise DecodeError(spath, f"image has no pixels ({w}x{h})")
            if im.format == "JPEG":
                # draft() keeps both sides >= the size asked for, so the
                # shorter side still covers `resize` after EXIF rotation.
                im.draft("RGB", (resize, resize))
            im.load()
            if im.getexif().get(_ORIENTATION, 1) in _QUARTER_TURNS:
                w, h = h, w
            im = ImageOps.exif_transpose(im)
            rgb = to_rgb(im)
            # The size before draft mode shrank it, for image_traits().
            rgb.info[ORIGINAL_SIZE] = (w, h)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError(spath, _unreadable_reason(path, spath)) from None
    except (OSError, ValueError, SyntaxError, MemoryError, EOFError) as e:
        raise read_error(spath, e) from None
    return rgb


def read_error(spath: str, e: BaseException) -> DecodeError:
    """The DecodeError, with its one-line reason, of ``spath`` that could not
    be read or decoded."""
    from imgindex.pipeline.errors import DecodeError

    if isinstance(e, FileNotFoundError):
        return DecodeError(spath, "file not found (deleted after discovery?)")
    if isinstance(e, PermissionError):
        return DecodeError(spath, "permission denied")
    if isinstance(e, IsADirectoryError):
        return DecodeError(spath, "is a directory, not an image file")
    return DecodeError(spath, _one_line(e))


def input_and_traits(
    image: Image.Image,
    content: str | FileHashes,
    resize: int = 256,
    crop: int = 224,
) -> tuple[np.ndarray, np.ndarray]:
    """The model input of an image from :func:`load_rgb`, and its
    :data:`pipeline.traits.TRAITS` row, the file's hashes included.

    ``content`` is the file's hashes where its bytes were hashed already,
    else the file's path to take them from; a file deleted since it was
    decoded gets hashes 0, which match nothing.
    """
    from imgindex.pipeline.traits import file_hashes, image_traits

    pixels = center_crop(image, resize, crop)
    row = image_traits(image, image.info.get(ORIGINAL_SIZE), pixels)
    if isinstance(content, str):
        try:
            content = file_hashes(content)
        except OSError:
            content = FileHashes()
    row["content"], row["digest"] = content
    return pixels, row


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping or black backgrounds."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        lo, hi = (0.0, 65535.0) if im.mode.startswith("I;16") else _range(arr)
        arr = np.clip((arr - lo) * (255.0 / max(hi - lo, 1e-6)), 0, 255)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def center_crop(im: Image.Image, resize: int, crop: int) -> np.ndarray:
    """Scale the shorter side to ``resize`` and cut the centre ``crop`` square.

    Done as one resampling of the crop box, which is cheaper than resizing the
    whole image and then cropping, and gives the same pixels.
    """
    w, h = im.size
    side = min(w, h) * crop / resize
    left = (w - side) / 2
    top = (h - side) / 2
    box = (left, top, left + side, top + side)
    out = im.resize((crop, crop), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out, dtype=np.uint8)


def _range(arr: np.ndarray) -> tuple[float, float]:
    if arr.size == 0:
        return 0.0, 1.0
    return float(arr.min()), float(arr.max())


def _unreadable_reason(path: str | os.PathLike | BinaryIO, label: str) -> str:
    if _size_or_none(path) == 0:
        return "empty file (0 bytes)"
    if not HEIF_READER and os.path.splitext(label)[1].lower() in HEIF_EXTENSIONS:
        return (
            "a HEIF image, and pillow-heif is not installed where it was read: "
            "pip install 'imgindex[heif]' on the workers"
        )
    return "not an image Pillow can read"


def _label(source: str | os.PathLike | BinaryIO) -> str:
    if isinstance(source, io.IOBase):
        name = getattr(source, "name", None)
        return name if isinstance(name, str) else "uploaded image"
    return os.fspath(source)


def _size_or_none(source: str | os.PathLike | BinaryIO) -> int | None:
    try:
        if isinstance(source, io.IOBase):
            return source.seek(0, os.SEEK_END)
        return os.path.getsize(source)
    except OSError:
        return None


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        text = f"{errno.errorcode.get(e.errno, 'OSError')}: {e.strerror}"
    else:
        text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return " ".join(text.split())
