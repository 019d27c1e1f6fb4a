"""Seeded analytic 3D scenes rendered by exact vectorized ray casting.

A scene is a closed, textured, axis-aligned room (floor, ceiling and four walls) holding 3-6 textured
primitives (spheres, boxes rotated about the vertical axis, vertical cylinders).  It serves two purposes:

* the pipeline's built-in default input: a first frame (:meth:`ProceduralScene.render` with the identity
  pose and :func:`default_intrinsics`) plus :attr:`ProceduralScene.prompt`, an English sentence describing it;
* exact ground truth for any novel view (RGB, metric z-depth, object ids) and exact visibility tests
  (:meth:`ProceduralScene.first_hit`, :meth:`ProceduralScene.visible_from`).

Conventions (shared with the whole project):

* OpenCV camera axes: x right, y down, z forward.  The world frame is the first camera's frame: the default
  first camera sits at the origin looking along +z with the identity pose.  The floor is the plane
  ``y = +floor_y`` (below the camera), the ceiling ``y = ceiling_y < 0``.
* Cameras are plain tensors: ``c2w`` (N,4,4) camera-to-world rigid transforms and ``K`` (N,3,3) pixel
  intrinsics.  Pixel (row i, col j) has its centre at continuous image coordinates
  (u, v) = (j + 0.5, i + 0.5); its ray is ``R @ K^-1 [u, v, 1]`` from the camera centre ``c2w[:3, 3]``.
* Depth is z-depth in the rendering camera (distance along its +z axis), 0 where nothing is hit.
* Box yaw: ``world = Ry(yaw) @ local`` with ``Ry = [[c, 0, s], [0, 1, 0], [-s, 0, c]]``.

Colours are an exact function of the hit point (and of the primitive hit): procedural textures are
evaluated from the 3D position in the primitive's own frame and shading is view independent (Lambert under
a fixed directional light and a fixed point light, plus ambient and analytic ambient-occlusion /
contact-shadow terms; no specular, no cast shadows), so the same 3D point has the same colour from every
view.  :meth:`ProceduralScene.colour_at` exposes that function.

Everything is deterministic: :func:`make_scene` draws from ``numpy.random.default_rng(seed)`` only and
rendering uses no randomness, so the same seed gives bit-identical renders (same machine / torch build).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lyra_ops.cameras import SE3_TOLERANCE, check_se3, default_intrinsics
from lyra_ops.errors import LyraInputError
from lyra_ops.scene_params import (
    FIRST_OBJECT_ID,
    ROOM_SURFACE_IDS,
    Material,
    Primitive,
    Room,
    SceneParams,
    sample_scene,
)

__all__ = [
    "ROOM_SURFACE_IDS",
    "ProceduralScene",
    "SceneRender",
    "default_intrinsics",
    "look_at_c2w",
    "make_scene",
]

_SE3_TOL = SE3_TOLERANCE
_DEFAULT_CHUNK_PIXELS = 1 << 16
_RENDER_TMIN = 1e-5  # rays start this far (in units of the unnormalised pixel ray, |d| >= 1) past the centre
_QUERY_CHUNK = 1 << 17  # rays per chunk in first_hit / visible_from
_QUERY_TMIN = 1e-9  # metres, for first_hit / visible_from (computed in float64)
_VISIBLE_ABS_EPS = 1e-6  # metres


# ----------------------------------------------------------------------------------------------------------
# Public helpers
# ----------------------------------------------------------------------------------------------------------


def look_at_c2w(eye: Any, target: Any) -> torch.Tensor:
    """OpenCV camera-to-world (4,4) float64 at ``eye``, +z pointing at ``target``, +y towards world 'down'.

    The image x axis stays horizontal (perpendicular to world y); ``target - eye`` must not be vertical.
    """
    e = torch.as_tensor(eye, dtype=torch.float64).reshape(-1)
    t = torch.as_tensor(target, dtype=torch.float64).reshape(-1)
    if e.shape != (3,) or t.shape != (3,) or not bool(torch.isfinite(e).all() & torch.isfinite(t).all()):
        raise LyraInputError(f"eye and target must be finite 3-vectors, got {e.tolist()} and {t.tolist()}")
    z = t - e
    if float(z.norm()) == 0.0:
        raise LyraInputError("target must differ from eye")
    z = z / z.norm()
    down = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    x = torch.linalg.cross(down, z)
    if float(x.norm()) < 1e-9:
        raise LyraInputError(f"target - eye must not be vertical, got {(t - e).tolist()}")
    x = x / x.norm()
    y = torch.linalg.cross(z, x)
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, e
    return c2w


@dataclass(frozen=True)
class SceneRender:
    """Exact render of a :class:`ProceduralScene` from N cameras.

    rgb: (N,3,H,W) float32 in [0,1]; depth: (N,1,H,W) float32 z-depth in each camera (0 = no hit);
    object_id: (N,1,H,W) int16 stable primitive ids (room surfaces 0-5, objects >= 6; -1 = no hit).
    """

    rgb: torch.Tensor
    depth: torch.Tensor
    object_id: torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) <= 0:
        raise LyraInputError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _as_float_tensor(value: Any, name: str, shape_text: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise LyraInputError(
                f"{name} must be a float tensor of shape {shape_text}, got {type(value)!r}"
            ) from exc
    if t.dtype == torch.bool or t.is_complex():
        raise LyraInputError(f"{name} must be a real float tensor of shape {shape_text}, got dtype {t.dtype}")
    return t.to(torch.float64)


def _require_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise LyraInputError(f"{name} must be finite, got a NaN/Inf value at index {bad}")


def _check_cameras(c2w: Any, K: Any) -> tuple[torch.Tensor, torch.Tensor]:
    c2w_t = _as_float_tensor(c2w, "c2w", "(N, 4, 4)")
    if c2w_t.ndim != 3 or c2w_t.shape[1:] != (4, 4) or c2w_t.shape[0] == 0:
        raise LyraInputError(f"c2w must have shape (N, 4, 4) with N >= 1, got {tuple(c2w_t.shape)}")
    n = c2w_t.shape[0]
    k_t = _as_float_tensor(K, "K", f"({n}, 3, 3)")
    if k_t.shape != (n, 3, 3):
        raise LyraInputError(
            f"K must have shape (N, 3, 3) = ({n}, 3, 3) to match c2w, got {tuple(k_t.shape)}"
        )
    _require_finite(c2w_t, "c2w")
    _require_finite(k_t, "K")
    check_se3(c2w_t, name="c2w", tol=_SE3_TOL)
    last = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    bad_k = ((k_t[:, 2, :] - last).abs().amax(dim=1) > 1e-6) | (k_t[:, 0, 0] <= 0) | (k_t[:, 1, 1] <= 0)
    bad_k |= k_t[:, 1, 0].abs() > 1e-9
    if bool(bad_k.any()):
        i = int(bad_k.nonzero()[0])
        raise LyraInputError(
            f"K[{i}] must be pixel intrinsics [[fx, s, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0, "
            f"got {k_t[i].tolist()}"
        )
    return c2w_t, k_t


def _check_points(value: Any, name: str) -> torch.Tensor:
    t = _as_float_tensor(value, name, "(M, 3)")
    if t.ndim != 2 or t.shape[1] != 3:
        raise LyraInputError(f"{name} must have shape (M, 3), got {tuple(t.shape)}")
    _require_finite(t, name)
    return t


# ----------------------------------------------------------------------------------------------------------
# Hashing and noise (exact, integer-lattice based; identical on every call)
# ----------------------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mix(h: torch.Tensor) -> torch.Tensor:
    """32-bit integer finaliser on int64 tensors holding values in [0, 2^32)."""
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & _M32
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & _M32
    return h ^ (h >> 16)


def _hash3(ix: torch.Tensor, iy: torch.Tensor, iz: torch.Tensor, salt: int) -> torch.Tensor:
    """Deterministic hash of integer lattice coordinates to int64 values in [0, 2^32)."""
    h = ((ix * 73856093) ^ (iy * 19349663) ^ (iz * 83492791) ^ (salt & _M32)) & _M32
    return _mix(h)


def _unit(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (h & 0xFFFFFF).to(dtype) * (1.0 / 16777216.0)


def _cell_rand(
    ix: torch.Tensor, iy: torch.Tensor, iz: torch.Tensor, salt: int, dtype: torch.dtype
) -> torch.Tensor:
    """Uniform [0,1) value per integer cell."""
    return _unit(_hash3(ix, iy, iz, salt), dtype)


def _value_noise(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, salt: int) -> torch.Tensor:
    """Smooth 3D value noise in [0,1] (trilinear interpolation of lattice hashes, smoothstep weights)."""
    fx, fy, fz = torch.floor(x), torch.floor(y), torch.floor(z)
    tx, ty, tz = x - fx, y - fy, z - fz
    tx = tx * tx * (3.0 - 2.0 * tx)
    ty = ty * ty * (3.0 - 2.0 * ty)
    tz = tz * tz * (3.0 - 2.0 * tz)
    ix, iy, iz = fx.long(), fy.long(), fz.long()
    hx0, hx1 = ix * 73856093, (ix + 1) * 73856093
    hy0, hy1 = iy * 19349663, (iy + 1) * 19349663
    hz0, hz1 = (iz * 83492791) ^ (salt & _M32), ((iz + 1) * 83492791) ^ (salt & _M32)
    dt = x.dtype

    def corner(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return _unit(_mix((a ^ b ^ c) & _M32), dt)

    c00 = torch.lerp(corner(hx0, hy0, hz0), corner(hx1, hy0, hz0), tx)
    c10 = torch.lerp(corner(hx0, hy1, hz0), corner(hx1, hy1, hz0), tx)
    c01 = torch.lerp(corner(hx0, hy0, hz1), corner(hx1, hy0, hz1), tx)
    c11 = torch.lerp(corner(hx0, hy1, hz1), corner(hx1, hy1, hz1), tx)
    return torch.lerp(torch.lerp(c00, c10, ty), torch.lerp(c01, c11, ty), tz)


def _fbm(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, salt: int, octaves: int = 2) -> torch.Tensor:
    """Fractal sum of value noise, normalised to [0,1]."""
    total = torch.zeros_like(x)
    amp, norm, freq = 1.0, 0.0, 1.0
    for o in range(octaves):
        total = total + amp * _value_noise(x * freq, y * freq, z * freq, salt + 7919 * o)
        norm += amp
        amp *= 0.5
        freq *= 2.03
    return total / norm


def _smoothstep(e0: float, e1: float, x: torch.Tensor) -> torch.Tensor:
    t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _frac(x: torch.Tensor) -> torch.Tensor:
    return x - torch.floor(x)


def _colour(c: Any, ref: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(c, dtype=ref.dtype).reshape(1, 3)


def _mix_rgb(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-row blend of colours a, b ((1,3) or (M,3)) with weights w (M,)."""
    return a + (b - a) * w.unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------
# Materials (procedural albedo textures)
# ----------------------------------------------------------------------------------------------------------


def _albedo(mat: Material, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Albedo (M,3) of material ``mat`` at texture coordinates (a, b, c).

    Room surfaces pass (in-plane horizontal, in-plane second axis, unused); objects pass their local frame
    coords normalised by the object's size.
    """
    p = mat.pattern
    s = mat.scale
    salt = mat.salt
    c0 = _colour(mat.colours[0], a)
    c1 = _colour(mat.colours[1], a) if len(mat.colours) > 1 else c0
    dt = a.dtype
    if p == "planks":  # a across planks, b along planks
        w, length = s, 1.3
        col_i = torch.floor(a / w)
        ci = col_i.long()
        offset = _cell_rand(ci, ci * 0, ci * 0, salt, dt) * length
        bb = (b + offset) / length
        row_i = torch.floor(bb)
        ri = row_i.long()
        fu = a / w - col_i
        fv = bb - row_i
        tone = _cell_rand(ci, ri, ri * 0 + 1, salt + 1, dt)
        warp = _fbm(a * 3.0, b * 0.5, tone * 17.0, salt + 2)
        grain = 0.5 + 0.5 * torch.sin(2.0 * math.pi * (a * 28.0 + 2.2 * warp + tone * 5.0))
        fine = _value_noise(a * 90.0, b * 4.0, tone * 31.0, salt + 3)
        base = _mix_rgb(c0, c1, 0.25 + 0.5 * tone)
        col = base * (0.78 + 0.16 * grain + 0.12 * fine).unsqueeze(1)
        gap = (torch.minimum(fu, 1.0 - fu) * w < 0.004) | (torch.minimum(fv, 1.0 - fv) * length < 0.004)
        return torch.where(gap.unsqueeze(1), c1 * 0.35, col)
    if p in ("checker", "stone", "ceiling"):
        size = s
        ia, ib = torch.floor(a / size), torch.floor(b / size)
        fa, fb = a / size - ia, b / size - ib
        ii, jj = ia.long(), ib.long()
        tile_r = _cell_rand(ii, jj, ii * 0, salt, dt)
        detail = _fbm(a * 14.0, b * 14.0, c * 0.0 + 0.5, salt + 1)
        if p == "checker":
            parity = ((ii + jj) & 1).to(dt)
            base = _mix_rgb(c0, c1, parity) * (0.93 + 0.1 * tile_r).unsqueeze(1)
            grout_w, grout = 0.012, _colour((0.35, 0.34, 0.32), a)
        elif p == "stone":
            grey = 0.42 + 0.3 * tile_r
            base = torch.stack([grey, grey * 0.98, grey * 0.94], dim=1) * (0.8 + 0.4 * detail).unsqueeze(1)
            grout_w, grout = 0.015, _colour((0.22, 0.21, 0.2), a)
        else:
            base = c0 * (0.95 + 0.05 * tile_r).unsqueeze(1)
            grout_w, grout = 0.01, c1
        col = base * (0.9 + 0.2 * detail).unsqueeze(1)
        edge = torch.minimum(torch.minimum(fa, 1.0 - fa), torch.minimum(fb, 1.0 - fb)) * size
        return torch.where((edge < grout_w).unsqueeze(1), grout * (0.85 + 0.3 * detail).unsqueeze(1), col)
    if p == "brick":  # a horizontal, b vertical (y down)
        bw, bh, mortar = s, s * 0.36, 0.012
        row_f = torch.floor(b / bh)
        ri = row_f.long()
        shifted = a / bw + 0.5 * (ri & 1).to(dt)
        col_f = torch.floor(shifted)
        ci = col_f.long()
        fu, fv = shifted - col_f, b / bh - row_f
        r = _cell_rand(ci, ri, ci * 0, salt, dt)
        r2 = _cell_rand(ci, ri, ci * 0 + 1, salt, dt)
        detail = _fbm(a * 25.0, b * 25.0, c * 0.0 + r * 9.0, salt + 1)
        base = _mix_rgb(c0, c0 * 0.6 + c1 * 0.4, r2) * (0.75 + 0.35 * r).unsqueeze(1)
        col = base * (0.82 + 0.3 * detail).unsqueeze(1)
        edge_u = torch.minimum(fu, 1.0 - fu) * bw
        edge_v = torch.minimum(fv, 1.0 - fv) * bh
        mortar_c = _colour((0.72, 0.70, 0.66), a) * (0.85 + 0.25 * detail).unsqueeze(1)
        return torch.where((torch.minimum(edge_u, edge_v) < mortar).unsqueeze(1), mortar_c, col)
    if p == "wallpaper":  # vertical stripes along a, ornament noise
        t = a / s
        f = _frac(t)
        stripe = (f < 0.5).to(dt)
        base = _mix_rgb(c1, c0, stripe)
        pin = (torch.minimum(torch.abs(f - 0.5), torch.minimum(f, 1.0 - f)) < 0.025).to(dt)
        orn = _value_noise(a * 40.0, b * 40.0, c * 0.0 + 3.0, salt)
        dots = _frac(b / (s * 0.5) + 0.5 * stripe)
        diamond = (torch.abs(f - 0.25 - 0.5 * (1 - stripe)) * 2.0 + torch.abs(dots - 0.5) < 0.18).to(dt)
        col = base * (0.92 + 0.12 * orn).unsqueeze(1)
        col = _mix_rgb(col, col * 0.75, diamond)
        return _mix_rgb(col, col * 0.6, pin)
    if p == "panels":  # vertical wood panels; a across, b along
        w = s
        ia = torch.floor(a / w)
        ii = ia.long()
        fu = a / w - ia
        tone = _cell_rand(ii, ii * 0, ii * 0, salt, dt)
        warp = _fbm(a * 4.0, b * 0.4, tone * 13.0, salt + 2)
        grain = 0.5 + 0.5 * torch.sin(2.0 * math.pi * (a * 22.0 + 2.5 * warp + tone * 3.0))
        base = _mix_rgb(c0, c1, 0.2 + 0.6 * tone)
        col = base * (0.8 + 0.22 * grain).unsqueeze(1)
        groove = (torch.minimum(fu, 1.0 - fu) * w < 0.008).unsqueeze(1)
        return torch.where(groove, c1 * 0.4, col)
    # ---- object textures: (a, b, c) are local coordinates normalised by object size
    detail = _value_noise(a * 24.0, b * 24.0, c * 24.0, salt + 5)
    if p == "checker_sph":
        rad = torch.sqrt(a * a + b * b + c * c).clamp_min(1e-12)
        lon = (torch.atan2(a, c) / (2.0 * math.pi) + 0.5) * (2.0 * s)
        lat = torch.acos((b / rad).clamp(-1.0, 1.0)) / math.pi * s
        w = ((torch.floor(lon).long() + torch.floor(lat).long()) & 1).to(dt)
    elif p == "stripes":
        w = (_frac(b * s + 0.15 * a) < 0.5).to(dt)
    elif p == "dots":
        ga, gb, gc = a * s, b * s, c * s
        da, db, dc = ga - torch.round(ga), gb - torch.round(gb), gc - torch.round(gc)
        w = (da * da + db * db + dc * dc < 0.09).to(dt)
    elif p == "marble":
        warp = _fbm(a * 1.7, b * 1.7, c * 1.7, salt, octaves=3)
        v = torch.sin(s * (a + 0.6 * b) + 9.0 * warp)
        w = 1.0 - _smoothstep(0.0, 0.35, torch.abs(v))
    elif p == "wood":
        warp = _fbm(a * 2.0, b * 0.35, c * 2.0, salt, octaves=2)
        r = torch.sqrt(a * a + c * c + 0.02) * s + 1.8 * warp
        w = _smoothstep(0.15, 0.85, _frac(r)) * 0.8
    elif p == "checker3d":
        w = ((torch.floor(a * s).long() + torch.floor(b * s).long() + torch.floor(c * s).long()) & 1).to(dt)
    elif p == "bands":  # cylinder: horizontal rings along local y
        w = (_frac(b * s) < 0.5).to(dt)
    elif p == "vstripes":  # cylinder: vertical stripes around the axis
        w = (_frac((torch.atan2(a, c) / (2.0 * math.pi) + 0.5) * (2.0 * round(s))) < 0.5).to(dt)
    elif p == "checker_cyl":
        ang = (torch.atan2(a, c) / (2.0 * math.pi) + 0.5) * (2.0 * round(s))
        w = ((torch.floor(ang).long() + torch.floor(b * s * 0.5).long()) & 1).to(dt)
    else:  # pragma: no cover - materials are built internally
        raise ValueError(f"unknown pattern {p}")
    return _mix_rgb(c0, c1, w) * (0.88 + 0.2 * detail).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------
# Ray casting (component-wise, broadcasting origins (1,) against directions (M,))
# ----------------------------------------------------------------------------------------------------------

_Vec = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _pick_t(t0: torch.Tensor, t1: torch.Tensor, ok: torch.Tensor, tmin: float) -> torch.Tensor:
    inf = torch.full_like(t0, math.inf)
    t = torch.where(t0 > tmin, t0, torch.where(t1 > tmin, t1, inf))
    return torch.where(ok, t, inf)


def _hit_sphere(o: _Vec, d: _Vec, dd: torch.Tensor, prim: Primitive, tmin: float) -> torch.Tensor:
    cx, cy, cz = prim.center
    r = prim.half[0]
    ox, oy, oz = o[0] - cx, o[1] - cy, o[2] - cz
    b = ox * d[0] + oy * d[1] + oz * d[2]
    tc = -b / dd
    qx, qy, qz = ox + tc * d[0], oy + tc * d[1], oz + tc * d[2]
    h2 = r * r - (qx * qx + qy * qy + qz * qz)
    s = torch.sqrt(h2.clamp_min(0.0) / dd)
    return _pick_t(tc - s, tc + s, h2 >= 0, tmin)


def _hit_box(o: _Vec, d: _Vec, prim: Primitive, tmin: float) -> torch.Tensor:
    cx, cy, cz = prim.center
    hx, hy, hz = prim.half
    c, s = math.cos(prim.yaw), math.sin(prim.yaw)
    wx, wy, wz = o[0] - cx, o[1] - cy, o[2] - cz
    lo = (c * wx - s * wz, wy, s * wx + c * wz)
    ld = (c * d[0] - s * d[2], d[1], s * d[0] + c * d[2])
    tnear: torch.Tensor | None = None
    tfar: torch.Tensor | None = None
    for oa, da, ha in zip(lo, ld, (hx, hy, hz), strict=True):
        da = torch.where(da.abs() < 1e-30, torch.full_like(da, 1e-30), da)
        inv = 1.0 / da
        t1 = (-ha - oa) * inv
        t2 = (ha - oa) * inv
        lo_t, hi_t = torch.minimum(t1, t2), torch.maximum(t1, t2)
        tnear = lo_t if tnear is None else torch.maximum(tnear, lo_t)
        tfar = hi_t if tfar is None else torch.minimum(tfar, hi_t)
    assert tnear is not None and tfar is not None
    return _pick_t(tnear, tfar, tnear <= tfar, tmin)


def _hit_cylinder(o: _Vec, d: _Vec, prim: Primitive, tmin: float) -> torch.Tensor:
    cx, cy, cz = prim.center
    r, hh = prim.half[0], prim.half[1]
    ox, oy, oz = o[0] - cx, o[1] - cy, o[2] - cz
    a = d[0] * d[0] + d[2] * d[2]
    a_safe = a.clamp_min(1e-30)
    b = ox * d[0] + oz * d[2]
    tc = -b / a_safe
    qx, qz = ox + tc * d[0], oz + tc * d[2]
    h2 = r * r - (qx * qx + qz * qz)
    s = torch.sqrt(h2.clamp_min(0.0) / a_safe)
    inf = math.inf
    side_ok = (h2 >= 0) & (a > 1e-30)
    t0, t1 = tc - s, tc + s
    y0, y1 = oy + t0 * d[1], oy + t1 * d[1]
    t0 = torch.where(side_ok & (y0.abs() <= hh) & (t0 > tmin), t0, inf)
    t1 = torch.where(side_ok & (y1.abs() <= hh) & (t1 > tmin), t1, inf)
    dy = torch.where(d[1].abs() < 1e-30, torch.full_like(d[1], 1e-30), d[1])
    best = torch.minimum(t0, t1)
    for plane in (-hh, hh):
        tp = (plane - oy) / dy
        px, pz = ox + tp * d[0], oz + tp * d[2]
        ok = (px * px + pz * pz <= r * r) & (tp > tmin)
        best = torch.minimum(best, torch.where(ok, tp, inf))
    return best


def _hit_room(o: _Vec, d: _Vec, room: Room, tmin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exit distance of the room box (its inner surfaces are seen from inside) and the surface id."""
    bounds = (
        (room.x_min, room.x_max, 4, 5),
        (room.ceiling_y, room.floor_y, 1, 0),
        (room.front_z, room.back_z, 3, 2),
    )
    best: torch.Tensor | None = None
    best_id: torch.Tensor | None = None
    enter: torch.Tensor | None = None
    for oa, da, (lo, hi, id_lo, id_hi) in zip(o, d, bounds, strict=True):
        pos = da > 0
        flat = da.abs() < 1e-30  # parallel to this slab
        da_safe = torch.where(flat, torch.ones_like(da), da)
        t_exit = torch.where(pos, (hi - oa) / da_safe, (lo - oa) / da_safe)
        t_in = torch.where(pos, (lo - oa) / da_safe, (hi - oa) / da_safe)
        t_exit = torch.where(flat, torch.full_like(t_exit, math.inf), t_exit)
        t_in = torch.where(flat, torch.full_like(t_in, -math.inf), t_in)
        ids = torch.where(pos, id_hi, id_lo).to(torch.int16)
        if best is None:
            best, best_id, enter = t_exit, ids, t_in
        else:
            closer = t_exit < best
            best = torch.where(closer, t_exit, best)
            best_id = torch.where(closer, ids, best_id)
            enter = torch.maximum(enter, t_in)
    assert best is not None and best_id is not None and enter is not None
    ok = (best > tmin) & (best >= enter)
    return torch.where(ok, best, math.inf), torch.where(ok, best_id, torch.full_like(best_id, -1))


# ----------------------------------------------------------------------------------------------------------
# The scene
# ----------------------------------------------------------------------------------------------------------


class ProceduralScene:
    """Immutable seeded analytic room scene; build it with :func:`make_scene`.

    Attributes: ``seed``, ``kind``, ``prompt`` (English description), ``room_bounds`` (float64 tensor
    [x_min, x_max, ceiling_y, floor_y, front_z, back_z]), ``object_ids`` (int16), ``object_centers`` (K,3),
    ``object_half_extents`` (K,3), ``object_yaw`` (K,) float64 tensors.
    """

    __slots__ = (
        "_params",
        "room_bounds",
        "object_ids",
        "object_centers",
        "object_half_extents",
        "object_yaw",
    )

    def __init__(self, params: SceneParams) -> None:
        self._params = params
        room, prims = params.room, params.prims
        self.room_bounds = torch.tensor(
            [room.x_min, room.x_max, room.ceiling_y, room.floor_y, room.front_z, room.back_z],
            dtype=torch.float64,
        )
        self.object_ids = torch.tensor([p.obj_id for p in prims], dtype=torch.int16)
        self.object_centers = torch.tensor([p.center for p in prims], dtype=torch.float64).reshape(-1, 3)
        self.object_half_extents = torch.tensor([p.half for p in prims], dtype=torch.float64).reshape(-1, 3)
        self.object_yaw = torch.tensor([p.yaw for p in prims], dtype=torch.float64)

    @property
    def seed(self) -> int:
        """Seed the scene was built from."""
        return self._params.seed

    @property
    def kind(self) -> str:
        """Scene family ('room')."""
        return self._params.kind

    @property
    def prompt(self) -> str:
        """English sentence describing the room and its objects (text prompt for the generator)."""
        return self._params.prompt

    @property
    def num_ids(self) -> int:
        """Number of distinct object ids (ids are 0 .. num_ids - 1)."""
        return FIRST_OBJECT_ID + len(self._params.prims)

    def __setattr__(self, name: str, value: Any) -> None:
        if hasattr(self, name):
            raise AttributeError(f"ProceduralScene is immutable; cannot set {name!r}")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"ProceduralScene(seed={self.seed}, kind={self.kind!r}, objects={len(self._params.prims)})"

    #  tracing ---------------------------------------------------------------------------------------------

    def _trace(self, o: _Vec, d: _Vec, tmin: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest hit t (in units of |d|) and id for rays o + t d; inf / -1 on a miss."""
        t_best, id_best = _hit_room(o, d, self._params.room, tmin)
        dd = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
        for prim in self._params.prims:
            if prim.kind == "sphere":
                t = _hit_sphere(o, d, dd, prim, tmin)
            elif prim.kind == "box":
                t = _hit_box(o, d, prim, tmin)
            else:
                t = _hit_cylinder(o, d, prim, tmin)
            closer = t < t_best
            t_best = torch.where(closer, t, t_best)
            id_best = torch.where(closer, torch.full_like(id_best, prim.obj_id), id_best)
        return t_best, id_best

    def _trace_chunked(
        self, o: torch.Tensor, d: torch.Tensor, tmin: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_trace` over (M,3) origins / directions, ``_QUERY_CHUNK`` rays at a time."""
        m = o.shape[0]
        t_out = torch.empty(m, dtype=d.dtype)
        id_out = torch.empty(m, dtype=torch.int16)
        for s in range(0, m, _QUERY_CHUNK):
            e = min(m, s + _QUERY_CHUNK)
            t, ids = self._trace(o[s:e].unbind(1), d[s:e].unbind(1), tmin)
            t_out[s:e] = t
            id_out[s:e] = ids
        return t_out, id_out

    def _normals(self, p: _Vec, ids: torch.Tensor) -> _Vec:
        """Outward (objects) / inward (room) unit normals at hit points: a function of point and id only."""
        nx, ny, nz = torch.zeros_like(p[0]), torch.zeros_like(p[0]), torch.zeros_like(p[0])
        room_n = {
            0: (0.0, -1.0, 0.0),
            1: (0.0, 1.0, 0.0),
            2: (0.0, 0.0, -1.0),
            3: (0.0, 0.0, 1.0),
            4: (1.0, 0.0, 0.0),
            5: (-1.0, 0.0, 0.0),
        }
        for sid, (a, b, c) in room_n.items():
            m = ids == sid
            nx = torch.where(m, a, nx)
            ny = torch.where(m, b, ny)
            nz = torch.where(m, c, nz)
        for prim in self._params.prims:
            m = ids == prim.obj_id
            if not bool(m.any()):
                continue
            cx, cy, cz = prim.center
            wx, wy, wz = p[0] - cx, p[1] - cy, p[2] - cz
            if prim.kind == "sphere":
                inv = 1.0 / prim.half[0]
                ax, ay, az = wx * inv, wy * inv, wz * inv
            elif prim.kind == "box":
                c, s = math.cos(prim.yaw), math.sin(prim.yaw)
                lx, ly, lz = c * wx - s * wz, wy, s * wx + c * wz
                rx, ry, rz = lx.abs() / prim.half[0], ly.abs() / prim.half[1], lz.abs() / prim.half[2]
                fx = (rx >= ry) & (rx >= rz)
                fy = ~fx & (ry >= rz)
                fz = ~fx & ~fy
                kx = torch.where(fx, torch.sign(lx), 0.0)
                ky = torch.where(fy, torch.sign(ly), 0.0)
                kz = torch.where(fz, torch.sign(lz), 0.0)
                ax, ay, az = c * kx + s * kz, ky, -s * kx + c * kz
            else:
                r, hh = prim.half[0], prim.half[1]
                rad = torch.sqrt(wx * wx + wz * wz)
                cap = (hh - wy.abs()) < (r - rad).abs()
                inv = 1.0 / rad.clamp_min(1e-12)
                ax = torch.where(cap, 0.0, wx * inv)
                ay = torch.where(cap, torch.sign(wy), 0.0)
                az = torch.where(cap, 0.0, wz * inv)
            nx = torch.where(m, ax, nx)
            ny = torch.where(m, ay, ny)
            nz = torch.where(m, az, nz)
        return nx, ny, nz

    def _shade_group(self, sid: int, px: torch.Tensor, py: torch.Tensor, pz: torch.Tensor) -> torch.Tensor:
        """Albedo (M,3) of points on surface ``sid``."""
        if sid == 0:
            alb = _albedo(self._params.materials["floor"], px, pz, pz * 0.0)
            return alb * self._floor_shadow(px, pz).unsqueeze(1)
        if sid == 1:
            return _albedo(self._params.materials["ceiling"], px, pz, pz * 0.0)
        if sid in (2, 3):
            return _albedo(self._params.materials["walls"], px, py, pz * 0.0 + sid)
        if sid in (4, 5):
            return _albedo(self._params.materials["walls"], pz, py, px * 0.0 + sid)
        prim = self._params.prims[sid - FIRST_OBJECT_ID]
        cx, cy, cz = prim.center
        wx, wy, wz = px - cx, py - cy, pz - cz
        m = prim.rot
        a = m[0] * wx + m[1] * wy + m[2] * wz
        b = m[3] * wx + m[4] * wy + m[5] * wz
        c = m[6] * wx + m[7] * wy + m[8] * wz
        norm = 1.0 / (prim.half[0] if prim.kind != "box" else max(prim.half[0], prim.half[2]))
        return _albedo(prim.material, a * norm, b * norm, c * norm)

    def _floor_shadow(self, px: torch.Tensor, pz: torch.Tensor) -> torch.Tensor:
        """Soft analytic contact shadows of the objects on the floor (a function of the floor point only)."""
        f = torch.ones_like(px)
        for prim in self._params.prims:
            cx, cy, cz = prim.center
            gap = self._params.room.floor_y - (cy + prim.half[1])
            rad = prim.horizontal_radius()
            spread = rad * (1.1 + 0.8 * gap)
            dist2 = ((px - cx) ** 2 + (pz - cz) ** 2) / (spread * spread)
            f = f * (1.0 - 0.55 * math.exp(-gap / 0.7) * torch.exp(-dist2 * 1.3))
        return f

    def _lighting(self, p: _Vec, n: _Vec, ids: torch.Tensor) -> torch.Tensor:
        room = self._params.room
        lx, ly, lz = -0.35, -0.85, -0.40
        ln = math.sqrt(lx * lx + ly * ly + lz * lz)
        lam = (n[0] * lx + n[1] * ly + n[2] * lz).clamp_min(0.0) / ln
        # point light just under the ceiling, in the middle of the room
        qx = 0.5 * (room.x_min + room.x_max) - p[0]
        qy = room.ceiling_y + 0.25 - p[1]
        qz = 0.5 * (max(room.front_z, 0.0) + room.back_z) - p[2]
        dist2 = qx * qx + qy * qy + qz * qz
        dist = torch.sqrt(dist2)
        pl = ((n[0] * qx + n[1] * qy + n[2] * qz) / dist).clamp_min(0.0) * (3.0 / (1.0 + 0.35 * dist2))
        sky = 0.5 - 0.5 * n[1]  # hemispheric ambient: upward-facing surfaces get more
        light = 0.22 + 0.12 * sky + 0.38 * lam + 0.45 * pl
        # ambient occlusion in the room corners: second-nearest wall distance (own plane is ~0)
        is_room = ids < FIRST_OBJECT_ID
        dists = torch.stack(
            [
                p[0] - room.x_min,
                room.x_max - p[0],
                p[1] - room.ceiling_y,
                room.floor_y - p[1],
                p[2] - room.front_z,
                room.back_z - p[2],
            ],
            dim=0,
        ).abs()
        second = torch.topk(dists, 2, dim=0, largest=False).values[1]
        ao = 1.0 - 0.4 * torch.exp(-second / 0.35)
        return light * torch.where(is_room, ao, torch.ones_like(ao))

    def _colour(self, p: _Vec, ids: torch.Tensor) -> torch.Tensor:
        """Final view-independent colour (M,3) at points ``p`` lying on surfaces ``ids`` (-1 -> black)."""
        out = torch.zeros(p[0].shape[0], 3, dtype=p[0].dtype)
        hit = ids >= 0
        if not bool(hit.any()):
            return out
        present = torch.unique(ids[hit]).tolist()
        for sid in present:
            idx = (ids == sid).nonzero().squeeze(1)
            alb = self._shade_group(int(sid), p[0][idx], p[1][idx], p[2][idx])
            out.index_copy_(0, idx, alb)
        n = self._normals(p, ids)
        shade = self._lighting(p, n, ids)
        out = (out * shade.unsqueeze(1)).clamp(0.0, 1.0)
        return torch.where(hit.unsqueeze(1), out, torch.zeros_like(out))

    #  public API ------------------------------------------------------------------------------------------

    def render(
        self,
        c2w: torch.Tensor,
        K: torch.Tensor,
        height: int,
        width: int,
        *,
        rows_per_chunk: int | None = None,
    ) -> SceneRender:
        """Render N views exactly (one ray per pixel centre).

        c2w: (N,4,4) camera-to-world rigid transforms (OpenCV axes); K: (N,3,3) pixel intrinsics;
        height, width: image size.  rows_per_chunk bounds memory (default: about 64k pixels per chunk).
        Returns a :class:`SceneRender` (rgb float32 [0,1], z-depth float32, object ids int16).
        """
        h = _check_positive_int(height, "height")
        w = _check_positive_int(width, "width")
        if rows_per_chunk is None:
            rows = max(1, _DEFAULT_CHUNK_PIXELS // w)
        else:
            rows = _check_positive_int(rows_per_chunk, "rows_per_chunk")
        c2w_t, k_t = _check_cameras(c2w, K)
        n = c2w_t.shape[0]
        dt = torch.float32
        rgb = torch.empty(n, 3, h, w, dtype=dt)
        depth = torch.empty(n, 1, h, w, dtype=dt)
        ids_out = torch.empty(n, 1, h, w, dtype=torch.int16)
        k_inv = torch.linalg.inv(k_t)
        u_all = torch.arange(w, dtype=torch.float64) + 0.5
        for v_idx in range(n):
            ray_mat = c2w_t[v_idx, :3, :3] @ k_inv[v_idx]  # world dir = ray_mat @ [u, v, 1]
            zrow = k_inv[v_idx, 2]  # camera-z component of K^-1 [u, v, 1]
            origin = tuple(c2w_t[v_idx, a, 3].reshape(1).to(dt) for a in range(3))
            for r0 in range(0, h, rows):
                r1 = min(h, r0 + rows)
                vv = (torch.arange(r0, r1, dtype=torch.float64) + 0.5).repeat_interleave(w)
                uu = u_all.repeat(r1 - r0)
                d = tuple((ray_mat[a, 0] * uu + ray_mat[a, 1] * vv + ray_mat[a, 2]).to(dt) for a in range(3))
                dz = (zrow[0] * uu + zrow[1] * vv + zrow[2]).to(dt)
                t, ids = self._trace(origin, d, _RENDER_TMIN)
                hit = ids >= 0
                t_safe = torch.where(hit, t, torch.zeros_like(t))
                p = (origin[0] + t_safe * d[0], origin[1] + t_safe * d[1], origin[2] + t_safe * d[2])
                col = self._colour(p, ids)
                rgb[v_idx, :, r0:r1, :] = col.T.reshape(3, r1 - r0, w)
                depth[v_idx, 0, r0:r1, :] = (t_safe * dz).reshape(r1 - r0, w)
                ids_out[v_idx, 0, r0:r1, :] = ids.reshape(r1 - r0, w)
        return SceneRender(rgb=rgb, depth=depth, object_id=ids_out)

    def first_hit(self, origins: torch.Tensor, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest surface along each ray, computed in float64.

        origins, dirs: (M,3); dirs need not be unit length (they are normalised internally).  Returns the
        Euclidean distance t (M,) from the origin to the hit (``inf`` on a miss) in the floating dtype of
        ``origins`` (float64 unless origins is float32/float16), and the object id (M,) int16 (-1 on a miss).
        Hits closer than 1e-9 to the origin are ignored (a ray starting on a surface does not hit it).
        """
        o = _check_points(origins, "origins")
        d = _check_points(dirs, "dirs")
        if o.shape != d.shape:
            raise LyraInputError(
                f"dirs must have the same shape as origins {tuple(o.shape)}, got {tuple(d.shape)}"
            )
        norm = d.norm(dim=1, keepdim=True)
        if bool((norm == 0).any()):
            i = int((norm[:, 0] == 0).nonzero()[0])
            raise LyraInputError(f"dirs must be non-zero vectors, got dirs[{i}] = {d[i].tolist()}")
        d = d / norm
        t, ids = self._trace_chunked(o, d, _QUERY_TMIN)
        out_dtype = (
            origins.dtype if isinstance(origins, torch.Tensor) and origins.is_floating_point() else None
        )
        return (t.to(out_dtype) if out_dtype is not None else t), ids

    def visible_from(
        self, points: torch.Tensor, camera_center: torch.Tensor, rel_tol: float = 1e-3
    ) -> torch.Tensor:
        """Exact occlusion test: (M,) bool, True iff nothing is hit on the segment camera_center -> point.

        A point counts as visible when the first hit along the segment is at distance
        ``>= |p - c| * (1 - rel_tol) - 1e-6``; so points lying on a surface are visible when nothing is in
        between.  Points outside the room are not visible from inside it; a point equal to the centre is
        visible.
        """
        p = _check_points(points, "points")
        c = _as_float_tensor(camera_center, "camera_center", "(3,)")
        if c.shape != (3,):
            raise LyraInputError(f"camera_center must have shape (3,), got {tuple(c.shape)}")
        _require_finite(c, "camera_center")
        if not isinstance(rel_tol, (int, float)) or not math.isfinite(rel_tol) or not 0.0 <= rel_tol < 1.0:
            raise LyraInputError(f"rel_tol must be a float in [0, 1), got {rel_tol!r}")
        vec = p - c.unsqueeze(0)
        dist = vec.norm(dim=1)
        vis = torch.ones(p.shape[0], dtype=torch.bool)
        nz = dist > 0
        if bool(nz.any()):
            dirs = vec[nz] / dist[nz].unsqueeze(1)
            o = c.unsqueeze(0).expand_as(dirs)
            t, _ = self._trace_chunked(o, dirs, _QUERY_TMIN)
            vis[nz] = t >= dist[nz] * (1.0 - rel_tol) - _VISIBLE_ABS_EPS
        return vis

    def colour_at(self, points: torch.Tensor, object_id: torch.Tensor) -> torch.Tensor:
        """View-independent shaded colour (M,3) of points lying on the surfaces ``object_id`` (M,) (-1 -> 0).

        :meth:`render` evaluates this same function (in float32) at each pixel's hit point.  Computed in the
        dtype of ``points`` if it is a float tensor, else float64.
        """
        p = _check_points(points, "points")
        if isinstance(points, torch.Tensor) and points.is_floating_point():
            p = p.to(points.dtype)
        ids = torch.as_tensor(object_id)
        if ids.shape != (p.shape[0],) or ids.is_floating_point() or ids.dtype == torch.bool:
            raise LyraInputError(
                f"object_id must be an integer tensor of shape ({p.shape[0]},), got "
                f"{tuple(ids.shape)} {ids.dtype}"
            )
        ids = ids.to(torch.int16)
        if bool(((ids < -1) | (ids >= self.num_ids)).any()):
            raise LyraInputError(
                f"object_id values must lie in [-1, {self.num_ids - 1}], got {ids.unique().tolist()}"
            )
        return self._colour(p.unbind(1), ids)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable parameters of the scene (provenance)."""
        return self._params.describe()


def make_scene(seed: int, *, kind: str = "room") -> ProceduralScene:
    """Build the deterministic scene for ``seed`` (a non-negative int); only ``kind='room'`` exists.

    Uses ``numpy.random.default_rng(seed)`` only (the global numpy / torch RNGs are untouched).
    """
    return ProceduralScene(sample_scene(seed, kind=kind))
