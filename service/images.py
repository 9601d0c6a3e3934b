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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from imgindex.pipeline.decode import load_rgb
from imgindex.pipeline.errors import DecodeError
from imgindex.pipeline.sources import Source, holder_stat, read_image
from imgindex.service.errors import ApiError

# Formats as Pillow names them -> the type browsers render as an image.
WEB_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "AVIF": "image/avif",
}
REENCODED_SIDE = 4096  # longest side of a re-encoded preview
# Lossy formats browsers do not show: re-encoded as JPEG (quality 92), as a
# photo's PNG is about 5 times that (1.1-1.7 bytes a pixel for the demo's
# photos: 13-21 MB for a 12-megapixel phone photo); the others as PNG.
LOSSY_TYPES = {"HEIF"}


@dataclass(frozen=True)
class ImageFile:
    """The bytes to send, their type, and the name to give them."""

    data: bytes
    content_type: str
    filename: str


@dataclass(frozen=True)
class IndexedImage:
    """An indexed image where its dataset keeps it: a file (its real path,
    checked to lie inside the dataset), a tar shard's member or a URL."""

    source: Source
    relpath: str  # within ``source``

    @property
    def location(self) -> str:
        return self.source.location(self.relpath)

    @property
    def name(self) -> str:
        return self.location.rstrip("/").rsplit("/", 1)[-1]

    def read(self) -> bytes:
        """Its bytes now.

        Raises
        ------
        ApiError
            404 if it cannot be read now.
        """
        try:
            return bytes(read_image(self.source, self.relpath))
        except DecodeError as e:
            raise ApiError(
                404, f"image {self.location!r} is unreadable now: {e.reason}"
            ) from None

    def stamp(self) -> tuple[int, int]:
        """(bytes, mtime in ns) of the file that holds it: the file itself,
        or its tar shard.

        Raises
        ------
        ApiError
            404 if that cannot be read now.
        """
        try:
            return holder_stat(self.source, self.relpath)
        except OSError as e:
            raise ApiError(
                404,
                f"image {self.location!r} is unreadable now: {e.strerror or e}",
            ) from None


def read_image_file(image: IndexedImage, max_pixels: int) -> ImageFile:
    """``image``'s bytes if they are an image a browser shows, else a JPEG
    (:data:`LOSSY_TYPES`) or PNG of it.

    Raises
    ------
    ApiError
        404 if the file cannot be read now, 415 if it is not an image (now).
    """
    data = image.read()
    try:
        with Image.open(io.BytesIO(data)) as im:
            kind = im.format
    except Exception:  # Pillow raises many kinds for what is not an image
        kind = None
    if kind in WEB_TYPES:
        return ImageFile(data, WEB_TYPES[kind], image.name)
    try:
        stream = io.BytesIO(data)
        stream.name = image.location
        # Upright 8-bit RGB, 16-bit and float images scaled as the model sees them.
        im = load_rgb(stream, REENCODED_SIDE, max_pixels)
    except DecodeError:
        raise ApiError(
            415,
            f"file {image.location!r} is not an image (any more); it is not served",
        ) from None
    im.thumbnail((REENCODED_SIDE, REENCODED_SIDE))
    buffer = io.BytesIO()
    if kind in LOSSY_TYPES:
        im.save(buffer, "JPEG", quality=92)
        return ImageFile(
            buffer.getvalue(), "image/jpeg", Path(image.name).stem + ".jpg"
        )
    im.save(buffer, "PNG")
    return ImageFile(buffer.getvalue(), "image/png", Path(image.name).stem + ".png")


def describe_image_file(image: IndexedImage) -> dict[str, Any]:
    """Size in pixels and bytes, format and date of ``image``, from its header.

    Raises
    ------
    ApiError
        404 if the file cannot be read now.
    """
    size, mtime_ns = image.stamp()
    # A file of its own is described from its stat and header; a tar member
    # or an object is read (the stamp is its shard's or its store's).
    opened = image.source.local_file(image.relpath)
    if opened is None:
        data = image.read()
        size, opened = len(data), io.BytesIO(data)
    info: dict[str, Any] = {
        "bytes": size,
        "modified": datetime.fromtimestamp(mtime_ns / 1e9, timezone.utc).isoformat(
            timespec="seconds"
        ),
        "width": None,
        "height": None,
        "format": None,
    }
    try:
        with Image.open(opened) as im:
            info.update(width=im.width, height=im.height, format=im.format)
    except Exception:  # not an image now: the sizes stay unknown
        pass
    return info
