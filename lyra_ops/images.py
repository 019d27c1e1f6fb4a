"""Image conversions shared by the stages: resize-to-cover + centre crop, [0,1] <-> [-1,1] <-> uint8."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cover_crop_transform(src_h: int, src_w: int, height: int, width: int) -> tuple[float, float, float]:
    """(scale, top, left) of :func:`cover_crop` from src_h x src_w to height x width: one scale for both axes
    (the smallest that covers the frame) and the centre crop's offsets in output pixels, fractional in general.
    A continuous source point (x, y) (pixel j centred at j + 0.5) lands at (scale x - left, scale y - top)."""
    scale = max(height / src_h, width / src_w)
    return scale, (src_h * scale - height) / 2.0, (src_w * scale - width) / 2.0


def _axis_taps(n_in: int, n_out: int, scale: float, offset: float, mode: str,
               antialias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and weights (n_out, taps) of one axis of :func:`cover_crop`: output pixel j (centre j + 0.5)
    reads around source coordinate (j + 0.5 + offset) / scale. ``nearest``: the pixel holding that point;
    ``bilinear`` / ``bicubic`` (a = -0.5, as torch's antialiased bicubic): the kernel stretched by 1 / scale when
    shrinking (``antialias``), taps outside the image dropped and the rest renormalised (as PIL and torch's
    antialiased resize do)."""
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5 + offset) / scale
    if mode == "nearest":
        return centre.floor().long().clamp(0, n_in - 1)[:, None], torch.ones(n_out, 1, dtype=torch.float64)
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"cover_crop: mode must be 'nearest', 'bilinear' or 'bicubic', got {mode!r}")
    radius = 1.0 if mode == "bilinear" else 2.0
    stretch = max(1.0 / scale, 1.0) if antialias else 1.0
    reach = radius * stretch
    taps = int(2 * reach) + 2
    first = (centre - reach - 0.5).floor().long()
    idx = first[:, None] + torch.arange(taps)[None, :]
    d = ((idx.double() + 0.5) - centre[:, None]).abs() / stretch
    if mode == "bilinear":
        w = (1.0 - d).clamp(min=0.0)
    else:
        a = -0.5
        w = torch.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                        torch.where(d < 2, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a, torch.zeros_like(d)))
    inside = (idx >= 0) & (idx < n_in)
    w = torch.where(inside, w, 0.0)
    w = w / w.sum(dim=1, keepdim=True)
    return idx.clamp(0, n_in - 1), w


def cover_crop(x: torch.Tensor, height: int, width: int, *, mode: str, antialias: bool = True) -> torch.Tensor:
    """Resize (C,H,W) by one scale so it covers height x width, and take the centred height x width window, in one
    resampling (:func:`cover_crop_transform`): pixels stay exactly square and the crop offset may be fractional,
    so an image centred on its principal point stays centred (:func:`cover_crop_intrinsics`). ``mode``:
    ``nearest`` (metric maps such as depth), ``bilinear`` or ``bicubic``; no clamping."""
    _, h, w = x.shape
    scale, top, left = cover_crop_transform(h, w, height, width)
    out = x
    for dim, n_in, n_out, offset in ((2, w, width, left), (1, h, height, top)):
        if mode != "nearest" and abs(offset) < 1e-9:  # the axis the scale fits: torch's own resize (the same taps)
            size = (out.shape[1], n_out) if dim == 2 else (n_out, out.shape[2])
            out = F.interpolate(out[None], size=size, mode=mode, align_corners=False, antialias=antialias)[0]
            continue
        if scale == 1.0 and offset == int(offset):  # a plain crop (e.g. 720 rows to 704)
            out = out.narrow(dim, int(offset), n_out)
            continue
        idx, wt = _axis_taps(n_in, n_out, scale, offset, mode, antialias)
        front = out.movedim(dim, 0).contiguous()  # the axis first: every tap gathers whole contiguous rows
        if idx.shape[1] == 1:  # nearest
            out = front[idx[:, 0]].movedim(0, dim)
            continue
        wt = wt.to(out.dtype).reshape(n_out, -1, *[1] * (out.ndim - 1))
        acc = front[idx[:, 0]] * wt[:, 0]
        for t in range(1, idx.shape[1]):  # one gather per tap: the taps are few (about 4 / scale when shrinking)
            acc += front[idx[:, t]] * wt[:, t]
        out = acc.movedim(0, dim)
    return out.contiguous()


def cover_crop_geometry(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(resized height, resized width, top, left) of :func:`cover_crop` rounded to whole pixels (for reports such
    as how much of an image the crop keeps)."""
    scale, top, left = cover_crop_transform(src_h, src_w, height, width)
    return max(height, round(src_h * scale)), max(width, round(src_w * scale)), round(top), round(left)


def cover_crop_intrinsics(K: torch.Tensor, src_h: int, src_w: int, height: int, width: int) -> torch.Tensor:
    """Pixel intrinsics (...,3,3) of a src_h x src_w camera after :func:`cover_crop` to height x width.

    The crop maps continuous pixel coordinates by one ``scale`` and shifts them by the (fractional) offsets
    (:func:`cover_crop_transform`): fx, fy, cx, cy scale by it and cx, cy lose ``left``, ``top``. Pixels keep their
    aspect exactly (fx'/fy' = fx/fy) and a principal point at the source centre lands at the output centre."""
    scale, top, left = cover_crop_transform(src_h, src_w, height, width)
    out = K.clone()
    out[..., :2, :] = K[..., :2, :] * scale
    out[..., 0, 2] -= left * K[..., 2, 2]
    out[..., 1, 2] -= top * K[..., 2, 2]
    return out


def cover_crop_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize an image (C,H,W) in [0,1] to cover height x width, centre-crop (bicubic, antialias), clamp.

    Unlike Lyra, which stretches inputs to 16:9 differently for each consumer, every stage sees the same
    undistorted frame.
    """
    return cover_crop(image, height, width, mode="bicubic").clamp(0.0, 1.0)


def to_uint8(image01: torch.Tensor) -> torch.Tensor:
    """[0,1] float -> uint8 with round-to-nearest."""
    return (image01.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def from_uint8(image: torch.Tensor) -> torch.Tensor:
    return image.to(torch.float32) / 255.0


def to_signed(image01: torch.Tensor) -> torch.Tensor:
    """[0,1] -> [-1,1] (the video model's and the warper's colour range)."""
    return image01 * 2.0 - 1.0


def from_signed(image: torch.Tensor) -> torch.Tensor:
    return ((image + 1.0) * 0.5).clamp(0.0, 1.0)
