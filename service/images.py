"""What the service sends of an indexed image file: an image, never a page.

A dataset file may have been replaced since it was indexed, by anything: an
HTML file behind an image's name would run its script on the service's
origin if it were sent with the type its name suggests. So the type comes
from the bytes: a format every browser shows as an image is sent as it is,
under its own type; any other image (TIFF, 16-bit PNG is still PNG, ...) is
re-encoded as PNG; anything else is refused.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.decode import load_rgb
from pipeline.errors import DecodeError
from service.errors import ApiError

# Formats as Pillow names them -> the type browsers render as an image.
WEB_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
}
REENCODED_SIDE = 4096  # longest side of a re-encoded preview


@dataclass(frozen=True)
class ImageFile:
    """The bytes to send, their type, and the name to give them."""

    data: bytes
    content_type: str
    filename: str


def read_image_file(path: Path, max_pixels: int) -> ImageFile:
    """``path``'s bytes if they are an image a browser shows, else a PNG of it.

    Raises
    ------
    ApiError
        404 if the file cannot be read now, 415 if it is not an image (now).
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _unreadable(path, e) from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            kind = im.format
    except Exception:  # Pillow raises many kinds for what is not an image
        kind = None
    if kind in WEB_TYPES:
        return ImageFile(data, WEB_TYPES[kind], path.name)
    try:
        stream = io.BytesIO(data)
        stream.name = str(path)
        # Upright 8-bit RGB, 16-bit and float images scaled as the model sees them.
        im = load_rgb(stream, REENCODED_SIDE, max_pixels)
    except DecodeError:
        raise ApiError(
            415, f"file {str(path)!r} is not an image (any more); it is not served"
        ) from None
    im.thumbnail((REENCODED_SIDE, REENCODED_SIDE))
    buffer = io.BytesIO()
    im.save(buffer, "PNG")
    return ImageFile(buffer.getvalue(), "image/png", path.stem + ".png")


def describe_image_file(path: Path) -> dict[str, Any]:
    """Size in pixels and bytes, format and date of ``path``, from its header.

    Raises
    ------
    ApiError
        404 if the file cannot be read now.
    """
    try:
        st = path.stat()
    except OSError as e:
        raise _unreadable(path, e) from None
    info: dict[str, Any] = {
        "bytes": st.st_size,
        "modified": datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat(
            timespec="seconds"
        ),
        "width": None,
        "height": None,
        "format": None,
    }
    try:
        with Image.open(os.fspath(path)) as im:
            info.update(width=im.width, height=im.height, format=im.format)
    except Exception:  # not an image now: the sizes stay unknown
        pass
    return info


def _unreadable(path: Path, e: OSError) -> ApiError:
    return ApiError(404, f"image file {str(path)!r} is unreadable now: {e.strerror}")
