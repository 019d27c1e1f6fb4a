"""Baselines that need no learning, held-out cameras and the geometry/depth scores of the decoder-quality table.

Every number for the learned decoder is set beside these (``lyra_pipeline/quality.py`` assembles the table):

* :func:`flat_image`: the input frame's mean colour everywhere (with :func:`median_depth` as its depth: a flat
  plane), the floor any method must clear;
* :func:`rgbd_gaussians`: the input frame unprojected with its (exact) depth into one Gaussian per pixel;
* :func:`held_out_cameras`: seeded random poses near the trajectories that no model was trained or fed with;
* :func:`seen_mask`: pixels of such a camera whose surface at least one input frame saw (exact depths);
* :func:`depth_absrel` / :func:`plane_depth`: depth AbsRel of a render, and of a constant plane.

Pure functions over tensors: no I/O, no global RNG (held-out poses come from an explicit ``torch.Generator``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lyra_ops.cameras import Cameras
from lyra_ops.errors import LyraInputError
from lyra_ops.gaussians import Gaussians
from lyra_ops.optimize import init_gaussians_from_rgbd
from lyra_ops.warp import unproject_depth

# Measured on 2 procedural scenes (seeds 5, 11) at 176x320, mean PSNR vs the exact renders of frames 8, 16,
# 24 of Lyra's six paths: scale factor 0.1 / 0.2 / 0.3 / 0.5 -> 16.77 / 16.77 / 16.62 / 15.95 dB; 0.2 keeps
# fewer gaps when a path moves towards the surfaces. The rasterizer's 0.3 px^2 screen-space dilation already
# blurs each splat by ~0.55 px, so larger splats only smear the input view (frame 0: 29.7 dB at 0.2, 25.2 at 0.5).
RGBD_SCALE_FACTOR = 0.2
RGBD_OPACITY = 0.95  # near-opaque so the unprojected frame renders back (3DGS's 0.1 init would be see-through)


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def flat_image(rgb_input: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The constant image (3,height,width) of ``rgb_input``'s mean colour (``rgb_input``: (3,h,w) in [0, 1])."""
    if not isinstance(rgb_input, torch.Tensor) or rgb_input.ndim != 3 or rgb_input.shape[0] != 3:
        raise LyraInputError(f"flat_image: rgb_input must be a tensor (3, H, W), got {_shape(rgb_input)}")
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LyraInputError(f"flat_image: {name} must be a positive int, got {value!r}")
    mean = rgb_input.to(torch.float32).mean(dim=(1, 2))
    return mean[:, None, None].expand(3, height, width).contiguous()


def rgbd_gaussians(
    rgb: torch.Tensor,
    depth: torch.Tensor,
    K: torch.Tensor,
    c2w: torch.Tensor,
    *,
    stride: int = 1,
    opacity: float = RGBD_OPACITY,
    scale_factor: float = RGBD_SCALE_FACTOR,
) -> Gaussians:
    """The input frame as Gaussians: one per (strided) pixel at its unprojected depth, with the pixel's colour.

    A thin wrapper of :func:`lyra_ops.optimize.init_gaussians_from_rgbd` with render-back settings: opacity
    0.95 and isotropic scale ``0.2 x depth / fx`` per pixel (see ``RGBD_SCALE_FACTOR`` for the measurement).
    ``rgb`` (3,H,W) in [0, 1]; ``depth`` (H,W) or (1,H,W) z-depth (<= 0: no Gaussian); ``K`` (3,3), ``c2w`` (4,4).
    """
    if isinstance(depth, torch.Tensor) and depth.ndim == 3 and depth.shape[0] == 1:
        depth = depth[0]
    return init_gaussians_from_rgbd(rgb, depth, K, c2w, stride=stride, opacity=opacity, scale_factor=scale_factor)


def _rotation_xy(yaw: torch.Tensor, pitch: torch.Tensor) -> torch.Tensor:
    """(N,3,3) float64 R_y(yaw) @ R_x(pitch): yaw about the camera's y (down) axis, then pitch about its x axis."""
    cy, sy, cp, sp = torch.cos(yaw), torch.sin(yaw), torch.cos(pitch), torch.sin(pitch)
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], dim=-1).reshape(-1, 3, 3)
    rx = torch.stack([one, zero, zero, zero, cp, -sp, zero, sp, cp], dim=-1).reshape(-1, 3, 3)
    return ry @ rx


def held_out_cameras(
    trajectory_c2w: torch.Tensor,
    input_c2w: torch.Tensor,
    K: torch.Tensor,
    height: int,
    width: int,
    count: int,
    generator: torch.Generator,
    *,
    margin: float = 0.25,
    min_extent: float = 0.05,
    max_angle_deg: float = 15.0,
    min_distance: float = 0.02,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    accept: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_rounds: int = 64,
) -> Cameras:
    """``count`` random poses inside the region of the trajectories, none of them a trajectory pose.

    Positions are uniform in the axis-aligned box of the trajectory camera centres (``trajectory_c2w`` (M,4,4),
    every camera of every trajectory), each side widened by ``margin`` x the box size (at least ``min_extent``
    wide per axis), intersected with ``bounds`` (lo (3,), hi (3,), e.g. the room shrunk by a safety margin)
    when given. Orientations are the input camera's (``input_c2w`` (4,4)) turned by a yaw about its y axis and
    then a pitch about its x axis, each uniform in [-max_angle_deg, max_angle_deg] (no roll), so the optical
    axis stays within ~21 degrees of the input's at the 15 degree default. A candidate is rejected when its
    centre lies within ``min_distance`` of any trajectory centre or when ``accept(centres (B,3)) -> (B,) bool``
    (e.g. "the segment from the input camera is free", so no camera sits inside an object) says no; rounds of
    ``count`` candidates are drawn until ``count`` pass (``LyraInputError`` after ``max_rounds``).
    Deterministic given the generator's state. Returns float32 :class:`Cameras` with intrinsics ``K`` (3,3).
    """
    fn = "held_out_cameras"
    if not isinstance(trajectory_c2w, torch.Tensor) or trajectory_c2w.ndim != 3 or trajectory_c2w.shape[1:] != (4, 4):
        raise LyraInputError(f"{fn}: trajectory_c2w must be a tensor (M, 4, 4), got {_shape(trajectory_c2w)}")
    if trajectory_c2w.shape[0] == 0:
        raise LyraInputError(f"{fn}: trajectory_c2w holds no camera")
    if not isinstance(input_c2w, torch.Tensor) or tuple(input_c2w.shape) != (4, 4):
        raise LyraInputError(f"{fn}: input_c2w must be a tensor (4, 4), got {_shape(input_c2w)}")
    if not isinstance(K, torch.Tensor) or tuple(K.shape) != (3, 3):
        raise LyraInputError(f"{fn}: K must be a tensor (3, 3), got {_shape(K)}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise LyraInputError(f"{fn}: count must be a positive int, got {count!r}")
    if not isinstance(generator, torch.Generator):
        raise LyraInputError(f"{fn}: generator must be a torch.Generator, got {type(generator).__name__}")
    for name, value in (("margin", margin), ("min_extent", min_extent), ("min_distance", min_distance)):
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise LyraInputError(f"{fn}: {name} must be a finite number >= 0, got {value!r}")
    if not isinstance(max_angle_deg, int | float) or not 0 <= max_angle_deg < 90:
        raise LyraInputError(f"{fn}: max_angle_deg must be in [0, 90), got {max_angle_deg!r}")
    centres = trajectory_c2w[:, :3, 3].to(torch.float64)
    lo, hi = centres.amin(dim=0), centres.amax(dim=0)
    pad = torch.maximum(margin * (hi - lo), 0.5 * (min_extent - (hi - lo)).clamp(min=0.0))
    lo, hi = lo - pad, hi + pad
    if bounds is not None:
        lo = torch.maximum(lo, torch.as_tensor(bounds[0], dtype=torch.float64))
        hi = torch.minimum(hi, torch.as_tensor(bounds[1], dtype=torch.float64))
        if bool((lo > hi).any()):
            raise LyraInputError(f"{fn}: bounds {bounds} do not overlap the trajectories' region")
    rot_in = input_c2w.to(torch.float64)[:3, :3]
    limit = math.radians(float(max_angle_deg))
    kept_pos: list[torch.Tensor] = []
    kept_rot: list[torch.Tensor] = []
    have = 0
    for _ in range(max_rounds):
        u = torch.rand(count, 5, generator=generator, dtype=torch.float64)
        pos = lo + (hi - lo) * u[:, :3]
        angles = (2.0 * u[:, 3:] - 1.0) * limit
        ok = torch.cdist(pos, centres).amin(dim=1) >= min_distance
        if accept is not None and bool(ok.any()):
            verdict = torch.as_tensor(accept(pos[ok].clone())).to(torch.bool).reshape(-1)
            ok[ok.clone()] = verdict
        if bool(ok.any()):
            kept_pos.append(pos[ok])
            kept_rot.append(rot_in @ _rotation_xy(angles[ok, 0], angles[ok, 1]))
            have += int(ok.sum())
        if have >= count:
            break
    if have < count:
        raise LyraInputError(
            f"{fn}: only {have} of {count} candidate poses passed the checks after {max_rounds} rounds; widen the "
            "margin / bounds or relax min_distance / accept"
        )
    c2w = torch.eye(4, dtype=torch.float64).repeat(count, 1, 1)
    c2w[:, :3, :3] = torch.cat(kept_rot)[:count]
    c2w[:, :3, 3] = torch.cat(kept_pos)[:count]
    k = K.to(torch.float32).expand(count, 3, 3).clone()
    return Cameras(c2w.to(torch.float32), k, int(height), int(width))


def seen_mask(
    depth_target: torch.Tensor,
    K_t: torch.Tensor,
    c2w_t: torch.Tensor,
    input_depths: torch.Tensor,
    input_Ks: torch.Tensor,
    input_c2ws: torch.Tensor,
    tol: float = 0.02,
    *,
    smooth_tol: float = 0.1,
    frames_per_chunk: int = 16,
) -> torch.Tensor:
    """(H,W) bool: pixels of a target camera whose surface at least one input frame saw (exact depths).

    Each target pixel with depth > 0 is unprojected with its exact z-depth (``depth_target`` (H,W), ``K_t``,
    ``c2w_t``) and projected into every input frame (``input_depths`` (N,H',W') or (N,1,H',W'), ``input_Ks``
    (N,3,3), ``input_c2ws`` (N,4,4)). It counts as seen by a frame when it lands inside that image in front
    of the camera and its z there agrees with the frame's exact depth: where the 2x2 pixel centres around the
    projection are smooth (max depth <= min depth x (1 + ``smooth_tol``)), ``z`` must lie within
    [min (1 - tol), max (1 + tol)] of them (so grazing surfaces pass at any sub-pixel position); across a depth
    edge, ``z`` must be within ``tol`` (relative) of the depth of the pixel it lands in (so a surface hidden
    behind a nearer one fails even next to the silhouette). Against exact ray-cast visibility
    (:func:`lyra_ops.metrics.source_visibility`, 3 held-out views of scene 11 at 96x160, 9 input frames) this
    agrees on 99.8% of the pixels (2x2 range test alone: 99.6%, with 4x more hidden pixels marked seen).
    """
    fn = "seen_mask"
    if not isinstance(depth_target, torch.Tensor) or depth_target.ndim != 2:
        raise LyraInputError(f"{fn}: depth_target must be a tensor (H, W), got {_shape(depth_target)}")
    if not isinstance(input_depths, torch.Tensor) or input_depths.ndim not in (3, 4):
        raise LyraInputError(f"{fn}: input_depths must be a tensor (N, H, W) or (N, 1, H, W), got "
                             f"{_shape(input_depths)}")
    if input_depths.ndim == 4:
        if input_depths.shape[1] != 1:
            raise LyraInputError(f"{fn}: input_depths (N, 1, H, W) expected, got {tuple(input_depths.shape)}")
        input_depths = input_depths[:, 0]
    n, h_in, w_in = input_depths.shape
    if tuple(input_Ks.shape) != (n, 3, 3) or tuple(input_c2ws.shape) != (n, 4, 4):
        raise LyraInputError(f"{fn}: input_Ks must be ({n}, 3, 3) and input_c2ws ({n}, 4, 4) to match input_depths, "
                             f"got {tuple(input_Ks.shape)} and {tuple(input_c2ws.shape)}")
    if not isinstance(tol, int | float) or not 0 <= tol < 1:
        raise LyraInputError(f"{fn}: tol must be a relative tolerance in [0, 1), got {tol!r}")
    h, w = depth_target.shape
    valid = depth_target > 0
    points = unproject_depth(depth_target.to(torch.float64), K_t.to(torch.float64), c2w_t.to(torch.float64))
    pts = points.reshape(-1, 3)[valid.reshape(-1)]  # (P,3)
    seen = torch.zeros(pts.shape[0], dtype=torch.bool)
    w2c = torch.linalg.inv(input_c2ws.to(torch.float64))
    ks = input_Ks.to(torch.float64)
    dep = input_depths.to(torch.float64)
    for c0 in range(0, n, frames_per_chunk):
        sl = slice(c0, c0 + frames_per_chunk)
        cam = torch.einsum("cij,pj->cpi", w2c[sl, :3, :3], pts) + w2c[sl, None, :3, 3]  # (C,P,3)
        z = cam[..., 2]
        uvw = torch.einsum("cij,cpj->cpi", ks[sl], cam)
        zs = torch.where(z > 0, z, torch.ones_like(z))
        u, v = uvw[..., 0] / zs, uvw[..., 1] / zs
        inside = (z > 0) & (u >= 0) & (u < w_in) & (v >= 0) & (v < h_in)
        j0 = torch.floor(u - 0.5).clamp(0, w_in - 1).long()
        i0 = torch.floor(v - 0.5).clamp(0, h_in - 1).long()
        j1, i1 = (j0 + 1).clamp(max=w_in - 1), (i0 + 1).clamp(max=h_in - 1)
        frame = torch.arange(dep[sl].shape[0])[:, None].expand_as(j0)
        nbrs = torch.stack([dep[sl][frame, i, j] for i, j in ((i0, j0), (i0, j1), (i1, j0), (i1, j1))])  # (4,C,P)
        pos = nbrs > 0
        d_min = torch.where(pos, nbrs, torch.full_like(nbrs, math.inf)).amin(dim=0)
        d_max = torch.where(pos, nbrs, torch.zeros_like(nbrs)).amax(dim=0)
        in_range = pos.any(dim=0) & (z >= d_min * (1.0 - tol)) & (z <= d_max * (1.0 + tol))
        smooth = pos.all(dim=0) & (d_max <= d_min * (1.0 + smooth_tol))
        nearest = dep[sl][frame, v.floor().clamp(0, h_in - 1).long(), u.floor().clamp(0, w_in - 1).long()]
        agree = torch.where(smooth, in_range, (nearest > 0) & ((z - nearest).abs() <= tol * nearest))
        seen |= (inside & agree).any(dim=0)
    out = torch.zeros(h * w, dtype=torch.bool)
    out[valid.reshape(-1)] = seen
    return out.reshape(h, w)


def depth_absrel(
    pred_depth: torch.Tensor, gt_depth: torch.Tensor, alpha: torch.Tensor, alpha_min: float = 0.5
) -> torch.Tensor:
    """Per image (N,) mean |pred - gt| / gt over pixels with ``alpha > alpha_min`` and ``gt > 0`` (NaN if none).

    ``pred_depth``, ``gt_depth``, ``alpha``: (N,1,H,W) (or any equal shapes with the image axis first); the
    prediction is a render's expected depth, ``alpha`` its accumulated opacity.
    """
    if not (isinstance(pred_depth, torch.Tensor) and isinstance(gt_depth, torch.Tensor)
            and isinstance(alpha, torch.Tensor)):
        raise LyraInputError("depth_absrel: pred_depth, gt_depth and alpha must be tensors")
    if pred_depth.shape != gt_depth.shape or alpha.shape != gt_depth.shape or gt_depth.ndim < 2:
        raise LyraInputError(f"depth_absrel: pred_depth {tuple(pred_depth.shape)}, gt_depth {tuple(gt_depth.shape)} "
                             f"and alpha {tuple(alpha.shape)} must share one shape (N, ...)")
    gt = gt_depth.to(torch.float64)
    valid = (alpha > alpha_min) & (gt > 0)
    rel = torch.where(valid, (pred_depth.to(torch.float64) - gt).abs() / torch.where(valid, gt, 1.0), 0.0)
    count = valid.flatten(1).sum(dim=1)
    out = rel.flatten(1).sum(dim=1) / count.clamp(min=1)
    return torch.where(count > 0, out, torch.full_like(out, math.nan))


def median_depth(depth: torch.Tensor) -> float:
    """Median of the positive, finite values of a depth map (the flat baseline's plane); raises when none."""
    d = depth.detach().to(torch.float64).reshape(-1)
    d = d[torch.isfinite(d) & (d > 0)]
    if d.numel() == 0:
        raise LyraInputError("median_depth: the depth map has no positive finite value")
    return float(d.median())


def plane_depth(gt_depth: torch.Tensor, input_depth: torch.Tensor) -> torch.Tensor:
    """Per image (N,) AbsRel of a constant plane at the input frame's median exact depth, over all pixels with
    ``gt_depth > 0`` (the depth score of a method that knows nothing about the scene but its typical depth).

    ``gt_depth`` (N,1,H,W) exact depth of the scored views; ``input_depth`` the input frame's exact depth.
    """
    level = median_depth(input_depth)
    return depth_absrel(torch.full_like(gt_depth, level, dtype=torch.float64), gt_depth, torch.ones_like(gt_depth))
