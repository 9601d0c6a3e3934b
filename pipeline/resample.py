"""Pillow's resampling and JPEG draft mode, as batched torch operations.

The CPU path (pipeline/decode.py) decodes a JPEG in Pillow's draft mode
(libjpeg scales it down by 2, 4 or 8 while decoding) and cuts the model's
input with one bilinear resampling of the crop box. The batch path
(pipeline/batch_decode.py) decodes whole JPEGs (nvJPEG on a GPU) and must
give the same model input, so it repeats those steps here on the device:
draft mode's reduction as a mean over blocks of the same size, then Pillow's
own resampling weights, in the same order and with the same rounding. The
weights are Pillow's ``precompute_coeffs`` (libImaging/Resample.c) written
as dense [n, out, in] matrices, so a batch of images of different sizes is
resampled by two batched matrix products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BILINEAR = "bilinear"
BOX = "box"
_SUPPORT = {BILINEAR: 1.0, BOX: 0.5}
DRAFT_SCALES = (8, 4, 2, 1)


def draft_scale(width: int, height: int, target: int) -> int:
    """The factor Pillow's ``JpegImageFile.draft(mode, (target, target))``
    shrinks a ``width`` x ``height`` JPEG by: the largest of 8, 4, 2, 1 that
    keeps both sides at least ``target`` (1 for smaller images)."""
    fits = min(width // target, height // target)
    return next((s for s in DRAFT_SCALES if fits >= s), 1)


def reduce_blocks(image: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 [h, w, c] -> uint8 [ceil(h/scale), ceil(w/scale), c]: the mean of
    each ``scale`` x ``scale`` block (partial ones at the edges over what they
    hold), which is what libjpeg's scaled decoding approximates."""
    if scale == 1:
        return image
    x = image.permute(2, 0, 1).unsqueeze(0).float()
    x = F.avg_pool2d(x, scale, scale, ceil_mode=True)
    return x.squeeze(0).permute(1, 2, 0).round_().to(torch.uint8)


def weights(
    in_sizes: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    out_size: int,
    width: int,
    kind: str = BILINEAR,
) -> torch.Tensor:
    """float32 [n, out_size, width]: Pillow's weights for resampling the span
    ``starts``..``ends`` (floats, in input pixels) of rows ``in_sizes`` long
    to ``out_size`` pixels; columns at and past an image's size weigh 0.

    Every argument but ``out_size``, ``width`` and ``kind`` is [n], one entry
    an image, on the device the weights are wanted on.
    """
    dtype = torch.float64 if in_sizes.device.type == "cpu" else torch.float32
    in_sizes, starts, ends = (
        t.to(dtype)[:, None, None] for t in (in_sizes, starts, ends)
    )
    scale = (ends - starts) / out_size
    filterscale = scale.clamp(min=1.0)
    support = _SUPPORT[kind] * filterscale
    out = torch.arange(out_size, device=in_sizes.device, dtype=dtype)[None, :, None]
    centre = starts + (out + 0.5) * scale
    low = torch.floor(centre - support + 0.5).clamp(min=0)
    high = torch.minimum(torch.floor(centre + support + 0.5), in_sizes)
    x = torch.arange(width, device=in_sizes.device, dtype=dtype)[None, None, :]
    arg = (x - centre + 0.5) / filterscale
    if kind == BILINEAR:
        w = (1 - arg.abs()).clamp(min=0)
    else:
        w = ((arg > -0.5) & (arg <= 0.5)).to(dtype)
    w = w * ((x >= low) & (x < high))
    total = w.sum(-1, keepdim=True)
    w = torch.where(total != 0, w / total.clamp(min=1e-30), w)
    return w.float()


def resample(canvas: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """uint8 [n, h, w, c] images -> uint8 [n, oy, ox, c], as Pillow resamples:
    rows first, rounded to 8 bits, then columns, rounded again.

    ``wy`` is [n, oy, h] and ``wx`` [n, ox, w] (:func:`weights`).
    """
    n, h, w, c = canvas.shape
    x = canvas.float().permute(0, 3, 1, 2).reshape(n, c * h, w)
    x = torch.bmm(x, wx.transpose(1, 2))  # [n, c*h, ox]
    x = _to_8bit(x).reshape(n, c, h, -1).permute(0, 2, 1, 3).reshape(n, h, -1)
    x = _to_8bit(torch.bmm(wy, x))  # [n, oy, c*ox]
    return x.reshape(n, wy.shape[1], c, -1).permute(0, 1, 3, 2).to(torch.uint8)


def resample_spans(
    canvas: torch.Tensor,
    heights: torch.Tensor,
    widths: torch.Tensor,
    spans: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    out: int,
    kind: str = BILINEAR,
) -> torch.Tensor:
    """uint8 [n, out, out, c]: the span (top, left, height, width; floats, in
    pixels) of each image of ``canvas`` resampled as Pillow's ``resize(box=)``
    does. The images are ``heights`` x ``widths``, padded to the canvas; all
    of these are [n] tensors, on any device."""
    device = canvas.device
    top, left, height, width = (t.to(device) for t in spans)
    heights, widths = heights.to(device), widths.to(device)
    wy = weights(heights, top, top + height, out, canvas.shape[1], kind)
    wx = weights(widths, left, left + width, out, canvas.shape[2], kind)
    return resample(canvas, wy, wx)


def _to_8bit(x: torch.Tensor) -> torch.Tensor:
    # Pillow adds half and truncates its fixed-point sums, then clips.
    return torch.floor_(x.add_(0.5)).clamp_(0, 255)


def grey(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3] RGB -> uint8 [...]: Pillow's ``convert("L")`` exactly
    (ITU-R 601 in 16-bit fixed point)."""
    rgb = images.to(torch.int32)
    level = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
    return (level >> 16).to(torch.uint8)
