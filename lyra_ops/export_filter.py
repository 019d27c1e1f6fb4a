"""Export filters: Gaussians made fit for viewers that draw them at other resolutions than the decoder's.

The decoder's input head draws one Gaussian per input pixel, about 0.2 px wide at the input camera. Our
rasterizer (like 3DGS/gsplat and PlayCanvas) adds 0.3 px^2 of screen-space variance to every Gaussian, so at the
input resolution these close up; a viewer at 4x that resolution sees them 4 px apart, about 1 px wide: a dot grid.
A filter here changes only what a camera (the input camera: ``c2w`` (4,4) camera-to-world, OpenCV axes, ``K``
(3,3) pixel intrinsics) sees below a pixel, so the picture at that camera's resolution stays close to the raw one.

* :func:`split_subpixel`: each Gaussian narrower than ``max_std_px`` at that camera is replaced by a 2 x 2 of
  sub-Gaussians over its pixel footprint (offsets +-``offset_px`` along the image axes, at its depth), each widened
  by ``add_px2`` px^2; a 4x viewer sees them 2 px apart and about as wide, which close up.
* :func:`floor_scales`: every Gaussian narrower than ``floor_px`` at that camera is widened to it (a scale floor).

Pure functions: tensors in, :class:`~lyra_ops.gaussians.Gaussians` out.
"""

from __future__ import annotations

import math

import torch

from lyra_ops.errors import LyraInputError
from lyra_ops.gaussians import Gaussians

SPLIT_OPACITY = ("same", "split")
SPLIT_COLORS = ("same", "bilinear")
# Neighbours whose camera depth differs by more than this fraction are across a depth edge: their colours are not
# mixed into a sub-Gaussian's (bilinear colours).
EDGE_DEPTH_RATIO = 0.05


def _rotation(quats: torch.Tensor) -> torch.Tensor:
    """(M,3,3) rotation matrices of unit quaternions (M,4) (w, x, y, z)."""
    w, x, y, z = quats.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(-1, 3, 3)  # fmt: skip


def _check_camera(c2w: torch.Tensor, K: torch.Tensor) -> None:
    if not isinstance(c2w, torch.Tensor) or tuple(c2w.shape) != (4, 4):
        raise LyraInputError(f"c2w: expected a (4, 4) camera-to-world tensor, got {getattr(c2w, 'shape', c2w)!r}")
    if not isinstance(K, torch.Tensor) or tuple(K.shape) != (3, 3) or not bool((K[0, 0] > 0) & (K[1, 1] > 0)):
        raise LyraInputError(f"K: expected (3, 3) pixel intrinsics with positive focal lengths, got {K!r}")


def screen_footprint(g: Gaussians, c2w: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """Each Gaussian as the camera sees it: camera-space means (M,3), pixel coordinates (M,2) (u right, v down;
    pixel i spans [i, i+1)) and the larger variance (M,) in px^2 of its projected 2D covariance (EWA, without any
    renderer's dilation); inf for Gaussians at or behind the camera plane."""
    _check_camera(c2w, K)
    dtype = g.dtype
    w2c = torch.linalg.inv(c2w.to(g.device, torch.float64)).to(dtype)
    k = K.to(g.device, dtype)
    rot = w2c[:3, :3]
    cam = g.means @ rot.T + w2c[:3, 3]
    z = cam[:, 2]
    ok = z > 1e-6
    zs = torch.where(ok, z, torch.ones_like(z))
    fx, fy = k[0, 0], k[1, 1]
    uv = torch.stack([fx * cam[:, 0] / zs + k[0, 2], fy * cam[:, 1] / zs + k[1, 2]], dim=-1)
    jac = torch.zeros(g.num, 2, 3, dtype=dtype, device=g.device)
    jac[:, 0, 0] = fx / zs
    jac[:, 0, 2] = -fx * cam[:, 0] / zs**2
    jac[:, 1, 1] = fy / zs
    jac[:, 1, 2] = -fy * cam[:, 1] / zs**2
    r = rot @ _rotation(g.quats)  # world -> camera of each Gaussian's axes
    m = jac @ r * g.scales[:, None, :]
    cov = m @ m.transpose(1, 2)
    a, b, c = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1]
    top = 0.5 * (a + c) + torch.sqrt((0.5 * (a - c)) ** 2 + b * b)
    return cam, uv, torch.where(ok, top, torch.full_like(top, math.inf))


def _check_number(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise LyraInputError(f"{name}: expected a number in [{low}, {high}], got {value!r}")


def floor_scales(g: Gaussians, c2w: torch.Tensor, K: torch.Tensor, floor_px: float) -> Gaussians:
    """Every Gaussian whose larger screen std at the camera is below ``floor_px`` pixels widened to about that: an
    isotropic world variance ``(floor_px^2 - var) (z / f)^2`` added to each axis (var its larger screen variance,
    z its camera depth, f the mean focal length; exact near the optical axis with fx = fy, off it the projection
    stretches it more), opacity and colour unchanged; wider Gaussians, and those behind the camera, unchanged.
    ``floor_px`` 0: ``g``."""
    _check_number("floor_px", floor_px, 0.0, 8.0)
    if floor_px == 0 or g.num == 0:
        return g
    cam, _, var = screen_footprint(g, c2w, K)
    f = 0.5 * (K[0, 0] + K[1, 1]).to(g.device, g.dtype)
    add = torch.where(torch.isfinite(var), (floor_px**2 - var).clamp(min=0), torch.zeros_like(var))
    scales = torch.sqrt(g.scales.square() + (add * (cam[:, 2] / f).square())[:, None])
    return Gaussians(g.means, scales, g.quats, g.opacities, g.colors)


def _bilinear_colors(uv: torch.Tensor, z: torch.Tensor, colors: torch.Tensor, offsets: torch.Tensor,
                     height: int, width: int) -> torch.Tensor:
    """(M,4,3) colours of each Gaussian's four sub-Gaussians at pixel offsets ``offsets`` (4,2): bilinear in the
    image of the Gaussians' colours scattered to their pixels, each neighbour weighted only where a Gaussian sits
    at a depth within :data:`EDGE_DEPTH_RATIO` of the Gaussian's own (elsewhere its own colour stands in)."""
    px = uv.floor().long()
    inside = (px[:, 0] >= 0) & (px[:, 0] < width) & (px[:, 1] >= 0) & (px[:, 1] < height)
    flat = (px[:, 1].clamp(0, height - 1) * width + px[:, 0].clamp(0, width - 1))
    img = torch.zeros(height * width, 3, dtype=colors.dtype, device=colors.device)
    depth = torch.zeros(height * width, dtype=z.dtype, device=z.device)
    img[flat[inside]] = colors[inside]
    depth[flat[inside]] = z[inside]
    out = []
    for off in offsets:
        pos = uv + off - 0.5  # continuous coordinates on the grid of pixel centres
        base = pos.floor()
        frac = pos - base
        acc = torch.zeros_like(colors)
        for dx in (0, 1):
            for dy in (0, 1):
                wgt = (frac[:, 0] if dx else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1])
                qx, qy = base[:, 0].long() + dx, base[:, 1].long() + dy
                valid = (qx >= 0) & (qx < width) & (qy >= 0) & (qy < height)
                q = qy.clamp(0, height - 1) * width + qx.clamp(0, width - 1)
                near = valid & ((depth[q] - z).abs() <= EDGE_DEPTH_RATIO * z)
                acc = acc + wgt[:, None] * torch.where(near[:, None], img[q], colors)
        out.append(acc)
    return torch.stack(out, dim=1)


def split_subpixel(g: Gaussians, c2w: torch.Tensor, K: torch.Tensor, height: int, width: int, *,
                   max_std_px: float = 0.35, offset_px: float = 0.25, add_px2: float = 0.0225,
                   opacity: str = "split", colors: str = "same") -> Gaussians:
    """Each Gaussian whose larger screen std at the camera is below ``max_std_px`` pixels (the decoder's per-pixel
    input head) replaced by four sub-Gaussians over its pixel footprint; the others kept as they are, first, in
    their order, then the sub-Gaussians (four per split Gaussian, in its order).

    Sub-Gaussian (i, j), i, j in {-1, +1}: the mean moved by ``i offset_px`` pixels along the camera's x axis and
    ``j offset_px`` along its y axis at the Gaussian's depth z (``offset_px z / fx``, ``offset_px z / fy`` world
    units), every scale widened to ``sqrt(s^2 + add_px2 (z / f)^2)`` (f the mean focal length; rotation kept);
    opacity ``same`` (the Gaussian's) or ``split`` (``1 - (1 - a)^(1/4)``: four coincident copies composite to
    ``a``); colour ``same`` or ``bilinear`` (interpolated at the sub-Gaussian's pixel position from the split
    Gaussians' colours at their pixels, ``height`` x ``width``, never across a depth edge). At the camera, the four
    together have screen variance ``var + add_px2 + offset_px^2`` per axis instead of ``var``."""
    _check_number("max_std_px", max_std_px, 0.0, 8.0)
    _check_number("offset_px", offset_px, 0.0, 1.0)
    _check_number("add_px2", add_px2, 0.0, 4.0)
    if opacity not in SPLIT_OPACITY:
        raise LyraInputError(f"opacity: expected one of {', '.join(SPLIT_OPACITY)}, got {opacity!r}")
    if colors not in SPLIT_COLORS:
        raise LyraInputError(f"colors: expected one of {', '.join(SPLIT_COLORS)}, got {colors!r}")
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LyraInputError(f"{name}: expected a positive number of pixels, got {value!r}")
    if g.num == 0 or max_std_px == 0:
        return g
    cam, uv, var = screen_footprint(g, c2w, K)
    small = var < max_std_px**2
    if not bool(small.any()):
        return g
    k = K.to(g.device, g.dtype)
    part = g.index(small)
    z = cam[small, 2]
    signs = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]], dtype=g.dtype, device=g.device)
    offsets = offset_px * signs  # (4,2) pixels
    axes = torch.linalg.inv(c2w.to(g.device, torch.float64))[:3, :3].T.to(g.dtype)  # columns: camera x, y, z
    step = offsets[None, :, :] * (z[:, None, None] / torch.stack([k[0, 0], k[1, 1]]))  # (S,4,2) world units
    means = part.means[:, None, :] + step[..., 0:1] * axes[:, 0] + step[..., 1:2] * axes[:, 1]
    f = 0.5 * (k[0, 0] + k[1, 1])
    scales = torch.sqrt(part.scales.square() + (add_px2 * (z / f).square())[:, None])
    alpha = part.opacities if opacity == "same" else 1.0 - (1.0 - part.opacities).clamp(min=0) ** 0.25
    if colors == "same":
        rgb = part.colors[:, None, :].expand(-1, 4, 3)
    else:
        rgb = _bilinear_colors(uv[small], z, part.colors, offsets, height, width)
    s = part.num
    children = Gaussians(
        means=means.reshape(-1, 3), scales=scales[:, None, :].expand(s, 4, 3).reshape(-1, 3),
        quats=part.quats[:, None, :].expand(s, 4, 4).reshape(-1, 4),
        opacities=alpha[:, None].expand(s, 4).reshape(-1), colors=rgb.reshape(-1, 3).clamp(0, 1),
    )  # fmt: skip
    return Gaussians.cat([g.index(~small), children])
