"""When, and with which camera, a photo was taken: its EXIF capture record.

Two files whose EXIF names the same capture time to the sub-second and the
same camera are one exposure, whatever was done to the pixels since; two
files naming different capture times are two exposures, however alike their
pixels (a burst from a camera held still). A time to the second alone
cannot say one exposure: a burst takes several frames in one second.
Editors and converters usually keep EXIF; many web tools strip it, so a
missing record decides nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

import imgindex.pipeline.decode  # noqa: F401  (its HEIF reader, where installed)

_EXIF_IFD = 0x8769
_MAKE, _MODEL, _DATETIME = 0x010F, 0x0110, 0x0132
_ORIGINAL, _SUBSEC_ORIGINAL, _SERIAL = 0x9003, 0x9291, 0xA431


@dataclass(frozen=True)
class Capture:
    """An image's capture record: when (``YYYY:MM:DD HH:MM:SS[.sub]``) and
    with what (make, model, body serial; empty where not written)."""

    time: str
    camera: tuple[str, str, str]


def capture_of(file: str | BinaryIO) -> Capture | None:
    """The EXIF capture record of ``file``, None where it has no capture time
    (or is not an image Pillow can open). Reads the header only."""
    if not isinstance(file, str):
        file.seek(0)  # read already, for its pixels
    try:
        with Image.open(file) as image:
            exif = image.getexif()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None
    detail = exif.get_ifd(_EXIF_IFD)
    time = _text(detail.get(_ORIGINAL)) or _text(exif.get(_DATETIME))
    if not time:
        return None
    subsec = _text(detail.get(_SUBSEC_ORIGINAL))
    camera = (
        _text(exif.get(_MAKE)),
        _text(exif.get(_MODEL)),
        _text(detail.get(_SERIAL)),
    )
    return Capture(f"{time}.{subsec}" if subsec else time, camera)


def same_exposure(a: Capture | None, b: Capture | None) -> bool | None:
    """True: one exposure; False: two; None: a record is missing, names its
    time to the second only, or the cameras leave it open (none named)."""
    if a is None or b is None:
        return None
    if a.time != b.time:
        return False
    if "." not in a.time:  # to the second: a burst's frames share it
        return None
    known = [(x, y) for x, y in zip(a.camera, b.camera, strict=True) if x and y]
    return all(x == y for x, y in known) if known else None


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip("\x00 ").strip() if value is not None else ""
