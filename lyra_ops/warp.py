"""Forward warping of one RGB-D frame into target cameras by depth-weighted bilinear splatting (spec 1.3-1.6).

Pixel convention of the project: pixel (row i, col j) is centred at continuous image coordinates
(u, v) = (j + 0.5, i + 0.5); a point projected to (u', v') is splatted at pixel-index coordinates
(x, y) = (u' - 0.5, v' - 0.5) onto its floor / floor+1 neighbours with bilinear weights.

Two deliberate departures from Lyra's SDG warper (spec section 8, item 8 and 1.6 step 2):

* the depth-weight normaliser ``max_l`` is taken per target frame, over the points splatted into that frame,
  so a frame's output is bit-identical whether it is warped alone or with other frames;
* integral splat coordinates put weight 1 on their own pixel and 0 elsewhere (Lyra's floor/ceil gave 4x).

``forward_warp`` is the fast op, ``forward_warp_reference`` the short float64 transcription of the formulas
it is tested against. The fast op runs a C kernel (``_warp_cpu.c``, built at first use by
:mod:`lyra_ops.warp_kernel`) for float32 images of up to 14 channels, and its pure torch implementation otherwise
(no C compiler, ``LYRA_WARP_KERNEL=torch``, float64 images); both are tested against the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lyra_ops import warp_kernel
from lyra_ops.errors import LyraInputError

__all__ = [
    "WarpResult",
    "depth_reliability_mask",
    "forward_warp",
    "forward_warp_reference",
    "unproject_depth",
]

# Cap on the depth-weight exponent eta (Lyra's value for fp32/bf16).
ETA_CAP = 80.0
# Splat coordinates closer than this (pixels) to an integer are snapped onto it, in both ops. It absorbs the
# ~1e-12 px float64 round-off of unproject -> project, which would otherwise give a neighbour of an integral
# position a ~1e-12 weight: enough to set its mask, and, amplified by depth weights of up to exp(50), to
# visibly bleed a near point's colour into a far neighbour (e.g. under an identity pose).
SNAP_TOLERANCE = 1e-8
# The fast op stores depth weights as exp(_WEIGHT_SHIFT - eta) instead of 1 / exp(eta): the factor
# exp(_WEIGHT_SHIFT) is the same for every point of a frame and cancels in sum(w c) / sum(w), and it keeps
# weights in [4e-18, 2e17], far from float32 underflow (1 / exp(80) times a small bilinear weight is not).
_WEIGHT_SHIFT = 40.0
# Points are processed in blocks of this many, so that the float64 temporaries stay in cache.
_BLOCK = 1 << 16
# The C kernel (``_warp_cpu.c``) splats up to this many channels; more fall back to the torch splat.
_KERNEL_MAX_CHANNELS = 14


@dataclass(frozen=True)
class WarpResult:
    """Splatted frames: colour (F,C,H,W) with ``hole_value`` in holes, z-depth (F,1,H,W) with 0 in holes,
    and mask (F,1,H,W) bool, True where some splat weight landed."""

    rgb: Tensor
    depth: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        for name in ("rgb", "depth", "mask"):
            if not isinstance(getattr(self, name), Tensor):
                raise LyraInputError(
                    f"WarpResult.{name} must be a torch.Tensor, got {type(getattr(self, name))}"
                )
        if self.rgb.ndim != 4:
            raise LyraInputError(f"WarpResult.rgb must have shape (F,C,H,W), got {tuple(self.rgb.shape)}")
        f, _, h, w = self.rgb.shape
        for name in ("depth", "mask"):
            shape = tuple(getattr(self, name).shape)
            if shape != (f, 1, h, w):
                raise LyraInputError(
                    f"WarpResult.{name} must have shape {(f, 1, h, w)} (like rgb), got {shape}"
                )
        if self.mask.dtype != torch.bool:
            raise LyraInputError(f"WarpResult.mask must be a bool tensor, got dtype {self.mask.dtype}")

    @property
    def num_frames(self) -> int:
        """Number of target frames F."""
        return int(self.rgb.shape[0])


# ------------------------------------------------------------------------------------------------ validation


def _check_tensor(x: object, fn: str, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise LyraInputError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _all_finite(x: Tensor) -> bool:
    """True iff no element is NaN or +-Inf: one ``aminmax`` pass (NaN propagates into both), ~10x cheaper than
    ``isfinite(x).all()``, which writes a bool tensor of x's size."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _check_matrix(x: object, fn: str, name: str, size: int) -> Tensor:
    """A single (size,size) finite matrix as float64."""
    x = _check_tensor(x, fn, name)
    if tuple(x.shape) != (size, size):
        raise LyraInputError(f"{fn}: {name} must have shape ({size}, {size}), got {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise LyraInputError(f"{fn}: {name} contains NaN or Inf values")
    return x


def _check_matrix_batch(x: object, fn: str, name: str, size: int) -> Tensor:
    """(size,size) or (F,size,size) finite matrices as a float64 (F,size,size) batch."""
    x = _check_tensor(x, fn, name)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or tuple(x.shape[1:]) != (size, size):
        raise LyraInputError(
            f"{fn}: {name} must have shape (F, {size}, {size}) or ({size}, {size}), got {tuple(x.shape)}"
        )
    x = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise LyraInputError(f"{fn}: {name} contains NaN or Inf values")
    return x


def _check_depth_map(depth: object, fn: str, name: str = "depth") -> Tensor:
    depth = _check_tensor(depth, fn, name)
    if depth.ndim != 2:
        raise LyraInputError(f"{fn}: {name} must have shape (H, W), got {tuple(depth.shape)}")
    if not depth.is_floating_point():
        raise LyraInputError(f"{fn}: {name} must be a floating-point tensor, got dtype {depth.dtype}")
    if not _all_finite(depth):
        raise LyraInputError(f"{fn}: {name} contains NaN or Inf values (clamp or replace them first)")
    return depth.detach()


@dataclass(frozen=True)
class _WarpInputs:
    image: Tensor  # (C,H,W) work dtype
    depth: Tensor  # (H,W)
    valid: Tensor  # (H,W) bool: depth > 0 and source mask
    K_src: Tensor  # (3,3) float64
    c2w_src: Tensor  # (4,4) float64
    proj: Tensor  # (F,3,4) float64, K_tgt @ w2c_tgt[:3]
    dtype: torch.dtype  # float32, or float64 for float64 images


def _warp_inputs(
    fn: str,
    image: object,
    depth: object,
    K_src: object,
    c2w_src: object,
    K_tgt: object,
    w2c_tgt: object,
    source_mask: object,
    depth_weight_scale: float,
) -> _WarpInputs:
    image = _check_tensor(image, fn, "image")
    if image.ndim != 3:
        raise LyraInputError(f"{fn}: image must have shape (C, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise LyraInputError(f"{fn}: image must be a floating-point tensor, got dtype {image.dtype}")
    if not _all_finite(image):
        raise LyraInputError(f"{fn}: image contains NaN or Inf values")
    _, h, w = image.shape
    depth = _check_depth_map(depth, fn)
    if tuple(depth.shape) != (h, w):
        raise LyraInputError(
            f"{fn}: depth must have shape (H, W) = {(h, w)} like image, got {tuple(depth.shape)}"
        )
    valid = depth > 0
    if source_mask is not None:
        source_mask = _check_tensor(source_mask, fn, "source_mask")
        if tuple(source_mask.shape) != (h, w) or source_mask.dtype != torch.bool:
            raise LyraInputError(
                f"{fn}: source_mask must be a bool tensor of shape (H, W) = {(h, w)}, "
                f"got {source_mask.dtype} {tuple(source_mask.shape)}"
            )
        valid = valid & source_mask
    K_src = _check_matrix(K_src, fn, "K_src", 3)
    c2w_src = _check_matrix(c2w_src, fn, "c2w_src", 4)
    K_tgt = _check_matrix_batch(K_tgt, fn, "K_tgt", 3)
    w2c_tgt = _check_matrix_batch(w2c_tgt, fn, "w2c_tgt", 4)
    n_frames = max(K_tgt.shape[0], w2c_tgt.shape[0])
    if K_tgt.shape[0] not in (1, n_frames) or w2c_tgt.shape[0] not in (1, n_frames):
        raise LyraInputError(
            f"{fn}: K_tgt and w2c_tgt must hold the same number of frames F (or one, shared by all): "
            f"got K_tgt {tuple(K_tgt.shape)} and w2c_tgt {tuple(w2c_tgt.shape)}"
        )
    if not (np.isfinite(depth_weight_scale) and depth_weight_scale >= 0):
        raise LyraInputError(
            f"{fn}: depth_weight_scale must be a finite number >= 0, got {depth_weight_scale}"
        )
    K_tgt = K_tgt.expand(n_frames, 3, 3)
    w2c_tgt = w2c_tgt.expand(n_frames, 4, 4)
    # P = K [R | t], written out as explicit products so it is computed identically for every frame.
    proj = torch.zeros(n_frames, 3, 4, dtype=torch.float64)
    for r in range(3):
        for c in range(4):
            proj[:, r, c] = (
                K_tgt[:, r, 0] * w2c_tgt[:, 0, c]
                + K_tgt[:, r, 1] * w2c_tgt[:, 1, c]
                + (K_tgt[:, r, 2] * w2c_tgt[:, 2, c])
            )
    dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    return _WarpInputs(image.detach().to(dtype), depth, valid, K_src, c2w_src, proj, dtype)


# ------------------------------------------------------------------------------------------------ geometry


def _unproject64(depth: Tensor, K: Tensor, c2w: Tensor) -> Tensor:
    """World points (H,W,3) float64 of z-depth ``depth`` seen by (K, c2w), zero where depth <= 0."""
    h, w = depth.shape
    k_inv = torch.linalg.inv(K)
    u = (torch.arange(w, dtype=torch.float64) + 0.5)[None, :]
    v = (torch.arange(h, dtype=torch.float64) + 0.5)[:, None]
    d = torch.where(depth > 0, depth.to(torch.float64), 0.0)
    cam = [d * (k_inv[r, 0] * u + k_inv[r, 1] * v + k_inv[r, 2]) for r in range(3)]
    world = [c2w[r, 0] * cam[0] + c2w[r, 1] * cam[1] + c2w[r, 2] * cam[2] + c2w[r, 3] for r in range(3)]
    return torch.where((depth > 0)[..., None], torch.stack(world, dim=-1), 0.0)


def unproject_depth(depth: Tensor, K: Tensor, c2w: Tensor) -> Tensor:
    """World points (H,W,3) of the pixels of a z-depth map: X_w = c2w [d K^-1 (j+0.5, i+0.5, 1); 1].

    Args:
        depth: (H,W) metric z-depth; pixels with depth <= 0 get the zero vector.
        K: (3,3) pixel intrinsics of the source camera.
        c2w: (4,4) camera-to-world pose of the source camera (OpenCV axes).

    Returns:
        (H,W,3) tensor in ``depth``'s dtype (computed in float64).
    """
    fn = "unproject_depth"
    depth = _check_depth_map(depth, fn)
    points = _unproject64(depth, _check_matrix(K, fn, "K", 3), _check_matrix(c2w, fn, "c2w", 4))
    return points.to(depth.dtype)


def depth_reliability_mask(depth: Tensor, window: int = 5, threshold: float = 0.05) -> Tensor:
    """Lyra's depth-edge filter (spec 1.4): True where the local depth range is small relative to its mean.

    rho = (max - min) / (mean + 1e-6) over a ``window`` x ``window`` neighbourhood (stride 1, centred); a
    pixel is reliable iff rho < threshold and depth > 0. Max and min ignore the out-of-image padding; unlike
    Lyra (zero padding counted in the mean, which biases the mean low and flags borders), the mean averages
    only in-image pixels, so a constant depth map is reliable everywhere, borders included.

    Args:
        depth: (H,W) or (B,H,W) z-depth.
        window: odd window size >= 1.
        threshold: relative range threshold tau.

    Returns:
        bool tensor of ``depth``'s shape.
    """
    fn = "depth_reliability_mask"
    depth = _check_tensor(depth, fn, "depth")
    if depth.ndim not in (2, 3):
        raise LyraInputError(f"{fn}: depth must have shape (H, W) or (B, H, W), got {tuple(depth.shape)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise LyraInputError(f"{fn}: window must be an odd integer >= 1, got {window!r}")
    if not np.isfinite(threshold):
        raise LyraInputError(f"{fn}: threshold must be finite, got {threshold}")
    d = depth.detach()
    if not d.is_floating_point():
        d = d.to(torch.float32)
    x = d.reshape(-1, 1, *d.shape[-2:])
    pad = window // 2
    d_max = F.max_pool2d(x, window, stride=1, padding=pad)
    d_min = -F.max_pool2d(-x, window, stride=1, padding=pad)
    d_mean = F.avg_pool2d(x, window, stride=1, padding=pad, count_include_pad=False)
    rho = (d_max - d_min) / (d_mean + 1e-6)
    return ((rho < threshold) & (x > 0)).reshape(depth.shape)


# ------------------------------------------------------------------------------------------------ fast op


def _project_frame(points: Tensor, proj: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Target z' (N,), splat coordinates (x, y) = (u' - 0.5, v' - 0.5) (2,N) and the in-front flag (N,) (1.0
    where z' > 0, else 0.0) of points (3,N), all float64.

    The same float64 operations, in the same order, as the reference (``x_h = ((P00 X + P01 Y) + P02 Z) +
    P03``, then ``x_h / z' - 0.5``, snapped), so both produce bit-identical coordinates (hence identical floor
    cells and identical zero/non-zero bilinear weights) for the points in front; broadcast over the three rows
    to keep the number of tensor operations small. Coordinates are clamped to [-2, size + 1] (NaN, from
    0 / 0, becomes -2); those of points behind the camera are meaningless: callers use the flag.
    """
    terms = points[None] * proj[:, :3, None]  # (3,3,N): P[r, c] X_c
    hom = terms[:, 0] + terms[:, 1]
    hom += terms[:, 2]
    hom += proj[:, 3:]
    z = hom[2]
    front = torch.sign(z).clamp_(min=0.0)
    xy = hom[:2].div_(z).sub_(0.5)
    # Snap: xy - (xy - round(xy)) is exactly round(xy) (the difference is exact), arithmetic instead of where.
    off = xy - torch.round(xy)
    xy -= off.mul_(off.abs() <= SNAP_TOLERANCE)
    xy = torch.nan_to_num_(xy, nan=-2.0)
    xy[0].clamp_(-2.0, width + 1.0)
    xy[1].clamp_(-2.0, height + 1.0)
    return z, xy, front


def _splat_frame(points: Tensor, values: Tensor, proj: Tensor, height: int, width: int, scale: float,
                 work: dict[str, Tensor]) -> Tensor:
    """Accumulate the planar sums [sum w c..., sum w z, sum w] (C+2,H,W) of one target frame.

    ``points`` is (3,N) float64 world points, ``values`` (C,N) colours, both channel-major.

    The canvas is the image padded by two pixels on the top and left and three on the bottom and right,
    channel-major (C+2, (H+5)(W+5)). Splat coordinates are clamped to [-2, size + 1], so every floor cell and
    its three other corners (+1, +W+5, +W+6) lie on the canvas; a point that is not splatted (behind the
    camera, or floor outside [-1, size - 1]) gets zero bilinear weights. Boolean masks and ``where`` are
    avoided (several times slower than float arithmetic on the CPU): flags are 0.0 / 1.0 factors.
    """
    c, n = values.shape
    dtype = values.dtype
    row = width + 5
    cell, corner_w, z_out, l_out, canvas = (work[k] for k in ("cell", "corner_w", "z", "l", "canvas"))
    # Pass 1: floor cells, bilinear corner weights, z' and l = log(1 + z') (all 0 where not splatted).
    l_max = torch.zeros((), dtype=torch.float64)
    for s in range(0, n, _BLOCK):
        e = min(n, s + _BLOCK)
        z, xy, front = _project_frame(points[:, s:e], proj, height, width)
        cell0 = torch.floor(xy)
        frac = xy.sub_(cell0)
        # Integer-valued float64 arithmetic is exact in any order: cell = (y0 + 2) (W + 5) + x0 + 2.
        cell[s:e] = torch.add(cell0[0], cell0[1], alpha=row).add_(2 * row + 2)
        splat = work["inside"].index_select(0, cell[s:e]).mul_(front)  # 1.0: splatted into this frame
        # G[axis] = (1 - f, f), (1 - f) formed in float64 before rounding so that tiny weights keep their
        # relative accuracy; corner (dy, dx) = (0,0), (0,1), (1,0), (1,1) gets G[y, dy] G[x, dx].
        bil = torch.empty(2, 2, e - s, dtype=dtype)
        torch.sub(1.0, frac, out=bil[:, 0])
        bil[:, 1] = frac
        bil[1] *= splat.to(dtype)
        torch.mul(bil[1, :, None], bil[0, None], out=corner_w[:, s:e].view(2, 2, e - s))
        z = z.mul_(splat)
        z_out[s:e] = z
        log_z = torch.log(z.add_(1.0))  # l = log(1 + z')
        l_out[s:e] = log_z
        if e > s:
            l_max = torch.maximum(l_max, log_z.max())
    # Pass 2: depth weights exp(_WEIGHT_SHIFT - eta), eta = min(scale l / (max_l + 1e-7), ETA_CAP), and one
    # index_add_ per block of all C+2 channels of all four corners.
    factor = scale / (float(l_max) + 1e-7)
    canvas.zero_()
    offsets = torch.tensor([0, 1, row, row + 1], dtype=cell.dtype)[:, None]
    for s in range(0, n, _BLOCK):
        e = min(n, s + _BLOCK)
        depth_w = torch.mul(l_out[s:e], -factor).add_(_WEIGHT_SHIFT).clamp_(min=_WEIGHT_SHIFT - ETA_CAP).exp_()
        base = torch.empty(c + 2, 1, e - s, dtype=dtype)
        torch.mul(values[:, s:e], depth_w, out=base[:c, 0])
        torch.mul(z_out[s:e], depth_w, out=base[c, 0])
        base[c + 1, 0] = depth_w
        vals = base * corner_w[None, :, s:e]  # (C+2, 4, B)
        cells = (cell[s:e] + offsets).view(-1)  # (4 B,) corner-major, like vals
        canvas.index_add_(1, cells, vals.view(c + 2, -1))
    return canvas.view(c + 2, height + 5, row)[:, 2 : height + 2, 2 : width + 2]


def _work_buffers(n: int, c: int, height: int, width: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """Per-call scratch reused by every frame: per-point pass-1 results and the padded canvas."""
    inside = torch.zeros(height + 5, width + 5, dtype=torch.float64)
    inside[1 : height + 2, 1 : width + 2] = 1.0  # floor cells (-1..size-1) + 2: the splatted points
    return {
        "cell": torch.empty(n, dtype=torch.long),
        "corner_w": torch.empty(4, n, dtype=dtype),
        "z": torch.empty(n, dtype=dtype),
        "l": torch.empty(n, dtype=dtype),
        "inside": inside.view(-1),
        "canvas": torch.empty(c + 2, (height + 5) * (width + 5), dtype=dtype),
    }


def forward_warp(
    image: Tensor,
    depth: Tensor,
    K_src: Tensor,
    c2w_src: Tensor,
    K_tgt: Tensor,
    w2c_tgt: Tensor,
    *,
    source_mask: Tensor | None = None,
    depth_weight_scale: float = 50.0,
    hole_value: float = -1.0,
) -> WarpResult:
    """Warp a source RGB-D frame into F target cameras by depth-weighted bilinear splatting (spec 1.6).

    Every source pixel with depth > 0 (and ``source_mask``) is unprojected, projected into each target camera,
    dropped if z' <= 0, and splatted onto the floor / floor+1 neighbours of (u' - 0.5, v' - 0.5) with weight
    ``w = w_bilinear / (exp(eta) + 1e-7)``, ``eta = min(scale * l / (max_l + 1e-7), 80)``, ``l = log(1 +
    z')``, where ``max_l`` is the largest ``l`` among the points splatted into that frame (some neighbour
    inside the image). Output colour and depth are ``sum(w x) / sum(w)``; the mask is ``sum(w) > 0``.

    Colours are not clamped: each output is a convex combination of input colours, so it stays within their
    range (up to float rounding), whatever the range is.

    Splat coordinates within 1e-8 px of an integer are snapped onto it (``SNAP_TOLERANCE``), so that an
    identity pose reproduces the input exactly instead of leaking ~1e-12 weights (amplified by depth weights
    of up to exp(50)) into neighbours.

    Implementation (C kernel, float32 images): the unprojection is done once; per frame, pass 1 projects every
    point in float64 (the reference's operations, in its order) and keeps its floor cell, fractions, z' and
    l; pass 2 accumulates the (C+2) sums of the four corners into a float32 channel-last canvas with depth
    weights exp(40 - eta) (as below) and divides. Pass 1 is split over points, pass 2 over bands of rows that
    each thread fills in point order, so the bytes do not depend on the thread count.

    Implementation (torch): the unprojection is done once; frames are processed one after the other, each in two
    passes over blocks of ``_BLOCK`` points. Pass 1 projects in float64 (splat coordinates of ~1e3 need more
    than float32's 1e-4 resolution) and stores floor cells, bilinear weights and z'; pass 2 forms the depth
    weights and adds the (C+2) x 4 corner contributions of a block with one ``index_add_`` into a padded,
    channel-major canvas, accumulated in float32 (float64 for float64 images). The per-frame arrays do not
    depend on the other frames, which makes outputs batch-independent by construction; memory is
    ~(C + 2) x 4 bytes per pixel plus ~30 bytes per source point (~50 MB at 704x1280 for RGB), whatever F.

    Args:
        image: (C,H,W) float source colours (e.g. in [-1, 1]).
        depth: (H,W) metric z-depth of the source view.
        K_src: (3,3) source intrinsics (pixels).
        c2w_src: (4,4) source camera-to-world pose.
        K_tgt: (F,3,3) or (3,3) target intrinsics (a single matrix is shared by all frames).
        w2c_tgt: (F,4,4) or (4,4) target world-to-camera poses (likewise).
        source_mask: optional (H,W) bool; False pixels are not splatted (e.g. ``depth_reliability_mask``).
        depth_weight_scale: the 50 of eta; 0 disables depth weighting.
        hole_value: colour written where nothing landed.

    Returns:
        ``WarpResult`` with rgb (F,C,H,W), depth (F,1,H,W) and mask (F,1,H,W), float32 (float64 if the image
        is float64).
    """
    inp = _warp_inputs(
        "forward_warp", image, depth, K_src, c2w_src, K_tgt, w2c_tgt, source_mask, depth_weight_scale
    )
    points, values = _source_points(inp)
    return _splat_frames(points, values, inp.proj, inp.image.shape[1:], inp.dtype, depth_weight_scale, hole_value)


def forward_warp_sources(
    images: Sequence[Tensor],
    depths: Sequence[Tensor],
    K_srcs: Sequence[Tensor],
    c2w_srcs: Sequence[Tensor],
    K_tgt: Tensor,
    w2c_tgt: Tensor,
    *,
    source_masks: Sequence[Tensor | None] | None = None,
    depth_weight_scale: float = 50.0,
    hole_value: float = -1.0,
) -> WarpResult:
    """:func:`forward_warp` of several source RGB-D frames at once (a 3D cache of frames, as GEN3C's): the points of
    every source are splatted together into each target, so where sources overlap their colours blend by the same
    depth and bilinear weights as one source's pixels do. One source gives exactly :func:`forward_warp`'s result."""
    if not (len(images) == len(depths) == len(K_srcs) == len(c2w_srcs)) or not images:
        raise LyraInputError("forward_warp_sources: images, depths, K_srcs and c2w_srcs must be equally long, >= 1")
    masks = list(source_masks) if source_masks is not None else [None] * len(images)
    parts = [_warp_inputs("forward_warp_sources", im, d, k, c, K_tgt, w2c_tgt, m, depth_weight_scale)
             for im, d, k, c, m in zip(images, depths, K_srcs, c2w_srcs, masks, strict=True)]
    shapes = {p.image.shape for p in parts}
    if len(shapes) != 1:
        raise LyraInputError(f"forward_warp_sources: every source must have one (C,H,W) shape, got {sorted(shapes)}")
    pts, vals = zip(*(_source_points(p) for p in parts), strict=True)
    return _splat_frames(torch.cat(pts, dim=1), torch.cat(vals, dim=1), parts[0].proj, parts[0].image.shape[1:],
                         parts[0].dtype, depth_weight_scale, hole_value)


def _source_points(inp: _WarpInputs) -> tuple[Tensor, Tensor]:
    """World points (3,N) float64 and colours (C,N) of a source's splatted pixels, in raster order.

    The points are those of ``_unproject64`` (the same float64 operations in the same order, element by
    element), computed for the splatted pixels only; by the C kernel when it is available."""
    lib = warp_kernel.kernel()
    if lib is not None:
        return _source_points_kernel(lib, inp)
    c, _, w = inp.image.shape
    idx = inp.valid.reshape(-1).nonzero()[:, 0]
    d = inp.depth.reshape(-1).index_select(0, idx).to(torch.float64)
    u = torch.remainder(idx, w).to(torch.float64).add_(0.5)
    v = torch.div(idx, w, rounding_mode="floor").to(torch.float64).add_(0.5)
    k_inv = torch.linalg.inv(inp.K_src)
    world = torch.empty(3, idx.shape[0], dtype=torch.float64)
    for s in range(0, idx.shape[0], _BLOCK):  # blocks: the (3,3,B) temporaries stay in cache
        e = s + _BLOCK
        cam = k_inv[:, 0:1] * u[s:e] + k_inv[:, 1:2] * v[s:e]
        cam = (cam + k_inv[:, 2:3]).mul_(d[s:e])  # (3,B): d (k_r0 u + k_r1 v + k_r2)
        terms = inp.c2w_src[:3, :3, None] * cam[None]  # (3,3,B): c2w[r, k] cam_k
        block = torch.add(terms[:, 0], terms[:, 1], out=world[:, s:e])
        block += terms[:, 2]
        block += inp.c2w_src[:3, 3:]
    return world, inp.image.reshape(c, -1).index_select(1, idx)


def _source_points_kernel(lib, inp: _WarpInputs) -> tuple[Tensor, Tensor]:
    c, h, w = inp.image.shape
    valid = inp.valid.contiguous()
    n = int(valid.sum())
    world = torch.empty(3, n, dtype=torch.float64)
    values = torch.empty(c, n, dtype=inp.dtype)
    tensors = [inp.depth.to(torch.float64).contiguous(), valid, torch.linalg.inv(inp.K_src).contiguous(),
               inp.c2w_src.contiguous(), inp.image.contiguous(), world, values]
    rc = lib.lyra_warp_points(warp_kernel.dims([c, h, w, n, int(inp.dtype == torch.float64)]),
                              warp_kernel.ptrs(tensors))
    if rc != 0:
        raise RuntimeError(f"warp kernel: lyra_warp_points failed ({rc})")
    return world, values


def _splat_frames(points: Tensor, values: Tensor, proj: Tensor, size: tuple[int, int], dtype: torch.dtype,
                  depth_weight_scale: float, hole_value: float) -> WarpResult:
    """Splat points (3,N) with colours (C,N) into every target projection of ``proj`` (F,3,4)."""
    c = values.shape[0]
    h, w = size
    n_frames = proj.shape[0]
    rgb = torch.empty(n_frames, c, h, w, dtype=dtype)
    out_depth = torch.empty(n_frames, 1, h, w, dtype=dtype)
    mask = torch.empty(n_frames, 1, h, w, dtype=torch.bool)
    lib = warp_kernel.kernel()
    if lib is not None and c <= _KERNEL_MAX_CHANNELS and dtype == torch.float32:
        params = torch.tensor([float(depth_weight_scale), float(hole_value)], dtype=torch.float64)
        tensors = [points.contiguous(), values.to(dtype).contiguous(), proj.contiguous(), params, rgb, out_depth,
                   mask]
        rc = lib.lyra_warp_splat(warp_kernel.dims([values.shape[1], c, h, w, n_frames]), warp_kernel.ptrs(tensors),
                                 torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"warp kernel: lyra_warp_splat failed ({rc}: out of memory)")
        return WarpResult(rgb, out_depth, mask)
    work = _work_buffers(values.shape[1], c, h, w, dtype)
    for f in range(n_frames):
        acc = _splat_frame(points, values, proj[f], h, w, float(depth_weight_scale), work)
        hit = torch.gt(acc[c + 1], 0, out=mask[f, 0])
        torch.div(acc[:c], acc[c + 1], out=rgb[f])  # 0 / 0 in holes: filled below
        torch.div(acc[c], acc[c + 1], out=out_depth[f, 0])
        miss = ~hit
        rgb[f].masked_fill_(miss, hole_value)
        out_depth[f, 0].masked_fill_(miss, 0.0)
    return WarpResult(rgb, out_depth, mask)


# ------------------------------------------------------------------------------------------------ reference


def forward_warp_reference(
    image: Tensor,
    depth: Tensor,
    K_src: Tensor,
    c2w_src: Tensor,
    K_tgt: Tensor,
    w2c_tgt: Tensor,
    *,
    source_mask: Tensor | None = None,
    depth_weight_scale: float = 50.0,
    hole_value: float = -1.0,
) -> WarpResult:
    """Reference of ``forward_warp``: the formulas of spec 1.6 (with our two fixes) in float64 numpy, one
    ``np.add.at`` per corner per frame. Same arguments and result. It shares the unprojection, the snapping
    and the order of the projection's float64 operations with the fast op (not its accumulation), so both
    see bit-identical splat coordinates; positions are clipped to [-2, size + 1] (off-image either way)."""
    inp = _warp_inputs(
        "forward_warp_reference",
        image,
        depth,
        K_src,
        c2w_src,
        K_tgt,
        w2c_tgt,
        source_mask,
        depth_weight_scale,
    )
    c, h, w = inp.image.shape
    valid = inp.valid.numpy().reshape(-1)
    X, Y, Z = _unproject64(inp.depth, inp.K_src, inp.c2w_src).numpy().reshape(-1, 3)[valid].T
    colours = inp.image.to(torch.float64).numpy().reshape(c, -1)[:, valid].T  # (N,C)
    n_frames = inp.proj.shape[0]
    rgb = np.empty((n_frames, c, h, w))
    out_depth = np.empty((n_frames, 1, h, w))
    mask = np.empty((n_frames, 1, h, w), dtype=bool)
    for f in range(n_frames):
        P = inp.proj[f].numpy()
        # Same operation order as the fast op: x = ((P00 X + P01 Y) + P02 Z) + P03, then / z' - 0.5.
        x_h = X * P[0, 0] + Y * P[0, 1] + Z * P[0, 2] + P[0, 3]
        y_h = X * P[1, 0] + Y * P[1, 1] + Z * P[1, 2] + P[1, 3]
        z = X * P[2, 0] + Y * P[2, 1] + Z * P[2, 2] + P[2, 3]
        front = z > 0
        x, y = x_h[front] / z[front] - 0.5, y_h[front] / z[front] - 0.5
        x = np.where(np.abs(x - np.round(x)) <= SNAP_TOLERANCE, np.round(x), x).clip(-2.0, w + 1.0)
        y = np.where(np.abs(y - np.round(y)) <= SNAP_TOLERANCE, np.round(y), y).clip(-2.0, h + 1.0)
        z, col = z[front], colours[front]
        x0, y0 = np.floor(x), np.floor(y)
        fx, fy = x - x0, y - y0
        splatted = (x0 >= -1) & (x0 <= w - 1) & (y0 >= -1) & (y0 <= h - 1)
        log_z = np.log(1.0 + np.maximum(z, 0.0))
        max_l = log_z[splatted].max() if splatted.any() else 0.0
        eta = np.minimum(depth_weight_scale * log_z / (max_l + 1e-7), ETA_CAP)
        depth_w = np.exp(eta) + 1e-7
        sum_w = np.zeros((h, w))
        sum_wc = np.zeros((h, w, c))
        sum_wz = np.zeros((h, w))
        for dy, dx, w_bilinear in (
            (0, 0, (1 - fx) * (1 - fy)),
            (0, 1, fx * (1 - fy)),
            (1, 0, (1 - fx) * fy),
            (1, 1, fx * fy),
        ):
            px, py = (x0 + dx).astype(np.int64), (y0 + dy).astype(np.int64)
            inside = splatted & (px >= 0) & (px < w) & (py >= 0) & (py < h)
            wgt = (w_bilinear / depth_w)[inside]
            where = (py[inside], px[inside])
            np.add.at(sum_w, where, wgt)
            np.add.at(sum_wc, where, wgt[:, None] * col[inside])
            np.add.at(sum_wz, where, wgt * z[inside])
        hit = sum_w > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            rgb[f] = np.where(hit[None], np.moveaxis(sum_wc, -1, 0) / sum_w[None], hole_value)
            out_depth[f, 0] = np.where(hit, sum_wz / sum_w, 0.0)
        mask[f, 0] = hit
    return WarpResult(
        torch.from_numpy(rgb).to(inp.dtype), torch.from_numpy(out_depth).to(inp.dtype), torch.from_numpy(mask)
    )
