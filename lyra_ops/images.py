"""Image conversions shared by the stages: resize-to-cover + centre crop, [0,1] <-> [-1,1] <-> uint8."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cover_crop(x: torch.Tensor, height: int, width: int, *, mode: str) -> torch.Tensor:
    """Resize (C,H,W) so it covers height x width keeping its aspect (``mode`` of F.interpolate), then
    centre-crop. No clamping: works for images and for metric maps (``mode="nearest"`` for depth)."""
    _, h, w = x.shape
    new_h, new_w, top, left = cover_crop_geometry(h, w, height, width)
    smooth = {"antialias": True, "align_corners": False} if mode in ("bilinear", "bicubic") else {}
    resized = F.interpolate(x[None], size=(new_h, new_w), mode=mode, **smooth)[0]
    return resized[:, top : top + height, left : left + width]


def cover_crop_geometry(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(resized height, resized width, top, left) of :func:`cover_crop` from src_h x src_w to height x width."""
    scale = max(height / src_h, width / src_w)
    new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    return new_h, new_w, (new_h - height) // 2, (new_w - width) // 2


def cover_crop_intrinsics(K: torch.Tensor, src_h: int, src_w: int, height: int, width: int) -> torch.Tensor:
    """Pixel intrinsics (...,3,3) of a src_h x src_w camera after :func:`cover_crop` to height x width.

    ``F.interpolate`` (``align_corners=False``) maps continuous pixel coordinates (pixel j centred at j + 0.5)
    by exactly new_w / src_w and new_h / src_h, and the crop shifts them by (left, top): so fx, cx scale by the
    first and lose ``left``, fy, cy by the second and lose ``top``. The scale is one number up to the rounding of
    the resized size, so square pixels stay (nearly) square, unlike stretching each axis to the new size."""
    new_h, new_w, top, left = cover_crop_geometry(src_h, src_w, height, width)
    sx, sy = new_w / src_w, new_h / src_h
    out = K.clone()
    out[..., 0, :] = K[..., 0, :] * sx
    out[..., 1, :] = K[..., 1, :] * sy
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
