"""What a JPEG's header says, read from its bytes without decoding it.

The batch path (pipeline/batch_decode.py) sends a file to a batch decoder
(nvJPEG on a GPU) only when its header shows a plain baseline JPEG that the
decoder and the CPU path decode alike; everything else goes to the CPU path.
This reads just the markers before the first scan, in a few microseconds.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_SOI = b"\xff\xd8"
_EOI = b"\xff\xd9"
# Start-of-frame markers: C0 baseline, C1 extended, C2 progressive, C3
# lossless, C5-C7 differential, C9-CB and CD-CF arithmetic coding.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_SEQUENTIAL_HUFFMAN = {0xC0, 0xC1}
_SOS = 0xDA
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: no length field
_ORIENTATION = 0x0112
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"


@dataclass(frozen=True)
class JpegHeader:
    """The facts of one JPEG that decide how it is decoded."""

    width: int  # as stored, before EXIF orientation
    height: int
    components: int  # 1 grey, 3 YCbCr (or RGB), 4 CMYK/YCCK
    precision: int  # bits a sample
    sequential: (
        bool  # baseline or extended Huffman: not progressive, lossless, arithmetic
    )
    orientation: int  # EXIF orientation, 1 where there is none
    complete: bool  # the data ends with the end-of-image marker
    # Why the CPU path may treat it otherwise than its pixels say: an Adobe
    # segment that marks 3 components as RGB, XMP (Pillow reads orientation
    # from it too), or a multi-picture file (Pillow opens it as MPO).
    special: str = ""

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def plain(self) -> bool:
        """Whether a batch decoder decodes this as the CPU path would: a
        complete, sequential, 8-bit grey or colour JPEG with nothing special."""
        return (
            self.sequential
            and self.precision == 8
            and self.components in (1, 3)
            and self.complete
            and self.width > 0
            and self.height > 0
            and not self.special
        )


def read_header(data: bytes | memoryview) -> JpegHeader | None:
    """The header of the JPEG ``data``, or None where it is not one (or its
    header is damaged: the CPU path then says why)."""
    data = memoryview(data)
    if bytes(data[:2]) != _SOI:
        return None
    pos, end = 2, len(data)
    orientation, special = 1, ""
    exif_seen = False
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        segment = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(segment) != length - 2:
            return None
        if marker == 0xE1 and bytes(segment[:6]) == b"Exif\x00\x00" and not exif_seen:
            exif_seen = True  # Pillow reads the first EXIF segment only
            orientation = _exif_orientation(segment[6:])
            if orientation is None:
                orientation, special = 1, special or "exif"
        elif marker == 0xE1 and bytes(segment[: len(_XMP)]) == _XMP:
            special = special or "xmp"
        elif marker == 0xE2 and bytes(segment[:4]) == b"MPF\x00":
            special = special or "multi-picture"
        elif marker == 0xEE and bytes(segment[:5]) == b"Adobe" and len(segment) >= 12:
            if segment[11] == 0:  # transform 0: no YCbCr, RGB or CMYK as stored
                special = special or "adobe-rgb"
        elif marker in _SOF:
            if len(segment) < 6:
                return None
            precision, height, width, components = struct.unpack_from(">BHHB", segment)
            return JpegHeader(
                width=width,
                height=height,
                components=components,
                precision=precision,
                sequential=marker in _SEQUENTIAL_HUFFMAN,
                orientation=orientation,
                complete=bytes(data[-2:]) == _EOI,
                special=special,
            )
        elif marker in (_SOS, 0xD9):
            return None  # a scan (or the end) before any frame header
        pos += 2 + length
    return None


def _exif_orientation(tiff: memoryview) -> int | None:
    """Tag 0x0112 of IFD0 of a TIFF-structured EXIF block; 1 if absent or
    not a value 1-8 (Pillow then leaves the image as it is), None where it is
    stored otherwise than as one SHORT (left to Pillow to read)."""
    try:
        order = {b"II": "<", b"MM": ">"}[bytes(tiff[:2])]
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for i in range(count):
            tag, kind, n = struct.unpack_from(order + "HHI", tiff, ifd + 2 + 12 * i)
            if tag == _ORIENTATION:
                if kind != 3 or n != 1:  # one SHORT
                    return None
                (value,) = struct.unpack_from(order + "H", tiff, ifd + 10 + 12 * i)
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        pass
    return 1
