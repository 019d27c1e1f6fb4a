"""Conservative mask refinement (spec 1.7): remove splats that lie behind the stretched depth-seam surface.

A coarse triangle mesh is built over the depth discontinuities of the source view (``seam_mesh``), ray-cast
from each target camera (``mesh_depth``), and warped pixels whose splatted depth lies more than ``threshold``
behind the seam surface are invalidated (``refine_mask_conservative``).

``mesh_depth`` is the fast op: an exact rasterizer in homogeneous coordinates (no projection of vertices, so
triangles crossing the camera plane or behind it need no special case) that returns the same z-buffer as
the brute-force two-sided Moller-Trumbore ray cast of ``mesh_depth_reference``. Its rasterization loop and the
per-frame invalidation run in C (``_warp_cpu.c``, via :mod:`lyra_ops.warp_kernel`) when a compiler is available
(bit-identical to the torch loops, which run otherwise or with ``LYRA_WARP_KERNEL=torch``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lyra_ops import warp_kernel
from lyra_ops.errors import LyraInputError
from lyra_ops.warp import WarpResult

__all__ = ["mesh_depth", "mesh_depth_reference", "refine_mask_conservative", "seam_mesh"]

# Moller-Trumbore epsilon of the reference (Lyra's NVIDIA Warp kernel): |det| < eps or t <= eps is a miss.
MT_EPSILON = 1e-8
# Barycentric tolerance of the fast rasterizer's inside test (float64 round-off is ~1e-13 of a barycentric).
EDGE_TOLERANCE = 1e-9
# Bounds on the sizes of the vectorized work of the fast rasterizer (memory ~ 100 bytes per item).
_PAIR_CHUNK = 1 << 18  # (triangle, pixel row) pairs
_CANDIDATE_CHUNK = 1 << 18  # (triangle, pixel) candidates


# ------------------------------------------------------------------------------------------------ validation


def _check_tensor(x: object, fn: str, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise LyraInputError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_mesh_inputs(
    fn: str, vertices: object, faces: object, K: object, height: object, width: object
) -> tuple[Tensor, Tensor, Tensor]:
    vertices = _check_tensor(vertices, fn, "vertices_cam")
    if vertices.ndim != 2 or vertices.shape[1] != 3 or not vertices.is_floating_point():
        raise LyraInputError(
            f"{fn}: vertices_cam must be a float tensor of shape (V, 3), "
            f"got {vertices.dtype} {tuple(vertices.shape)}"
        )
    faces = _check_tensor(faces, fn, "faces")
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.is_floating_point() or faces.dtype == torch.bool:
        raise LyraInputError(
            f"{fn}: faces must be an integer tensor of shape (M, 3), got {faces.dtype} {tuple(faces.shape)}"
        )
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= vertices.shape[0]):
        raise LyraInputError(
            f"{fn}: faces must index vertices_cam in [0, {vertices.shape[0] - 1}], "
            f"got values in [{int(faces.min())}, {int(faces.max())}]"
        )
    K = _check_tensor(K, fn, "K")
    if tuple(K.shape) != (3, 3):
        raise LyraInputError(f"{fn}: K must have shape (3, 3), got {tuple(K.shape)}")
    if K[2].tolist() != [0.0, 0.0, 1.0]:
        raise LyraInputError(
            f"{fn}: K must be pinhole intrinsics with last row [0, 0, 1], got {K[2].tolist()}"
        )
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LyraInputError(f"{fn}: {name} must be a positive int, got {value!r}")
    vertices = vertices.detach().to(torch.float64)
    K = K.detach().to(torch.float64)
    if not bool(torch.isfinite(vertices).all()) or not bool(torch.isfinite(K).all()):
        raise LyraInputError(f"{fn}: vertices_cam and K must be finite (got NaN or Inf)")
    return vertices, faces.detach().to(torch.long), K


def _pixel_rays(K: Tensor, height: int, width: int) -> Tensor:
    """(H*W,3) float64 rays K^-1 [j+0.5, i+0.5, 1] through the pixel centres, row-major."""
    i, j = torch.meshgrid(
        torch.arange(height, dtype=torch.float64) + 0.5,
        torch.arange(width, dtype=torch.float64) + 0.5,
        indexing="ij",
    )
    pix = torch.stack([j, i, torch.ones_like(i)], dim=-1).reshape(-1, 3)
    return pix @ torch.linalg.inv(K).T


# ------------------------------------------------------------------------------------------------ mesh


def seam_mesh(points_cam: Tensor, boundary: Tensor, factor: int = 4) -> tuple[Tensor, Tensor]:
    """Triangle mesh over the depth seams of a point grid (spec 1.7 steps 1-2).

    The (H,W,3) grid is downsampled bilinearly (``F.interpolate``, align_corners=False) and the boundary
    nearest-neighbour to (H // factor, W // factor); every 2x2 cell with at least one boundary corner gives
    the triangles (tl, tr, bl) and (tr, br, bl). Unused vertices are dropped.

    Bilinear downsampling is an affine combination, so the mesh of rigidly transformed points is the rigidly
    transformed mesh (up to rounding): the mesh can be built once in world coordinates and moved per camera.

    Args:
        points_cam: (H,W,3) float points (any frame: camera or world).
        boundary: (H,W) bool seam pixels (e.g. ``~depth_reliability_mask(depth)``).
        factor: downsampling factor >= 1.

    Returns:
        vertices (V,3) in ``points_cam``'s dtype and faces (M,3) int64 indexing them.
    """
    fn = "seam_mesh"
    points_cam = _check_tensor(points_cam, fn, "points_cam")
    if points_cam.ndim != 3 or points_cam.shape[2] != 3 or not points_cam.is_floating_point():
        raise LyraInputError(
            f"{fn}: points_cam must be a float tensor of shape (H, W, 3), "
            f"got {points_cam.dtype} {tuple(points_cam.shape)}"
        )
    h, w = points_cam.shape[:2]
    boundary = _check_tensor(boundary, fn, "boundary")
    if tuple(boundary.shape) != (h, w) or boundary.dtype != torch.bool:
        raise LyraInputError(
            f"{fn}: boundary must be a bool tensor of shape (H, W) = {(h, w)}, "
            f"got {boundary.dtype} {tuple(boundary.shape)}"
        )
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise LyraInputError(f"{fn}: factor must be an int >= 1, got {factor!r}")
    hs, ws = h // factor, w // factor
    empty = (points_cam.new_zeros(0, 3), torch.zeros(0, 3, dtype=torch.long))
    if hs < 2 or ws < 2:
        return empty
    grid = F.interpolate(
        points_cam.detach().permute(2, 0, 1)[None], size=(hs, ws), mode="bilinear", align_corners=False
    )[0].permute(1, 2, 0)
    seams = F.interpolate(boundary[None, None].to(torch.float32), size=(hs, ws), mode="nearest")[0, 0] > 0.5
    cells = seams[:-1, :-1] | seams[:-1, 1:] | seams[1:, :-1] | seams[1:, 1:]
    ci, cj = cells.nonzero(as_tuple=True)
    if ci.numel() == 0:
        return empty
    tl = ci * ws + cj
    tr, bl = tl + 1, tl + ws
    br = bl + 1
    faces = torch.stack([torch.stack([tl, tr, bl], 1), torch.stack([tr, br, bl], 1)], 1).reshape(-1, 3)
    used = torch.zeros(hs * ws, dtype=torch.bool)
    used[faces.reshape(-1)] = True
    remap = torch.cumsum(used, 0) - 1
    return grid.reshape(-1, 3)[used].contiguous(), remap[faces]


# ------------------------------------------------------------------------------------------------ ray cast


def mesh_depth(vertices_cam: Tensor, faces: Tensor, K: Tensor, height: int, width: int) -> Tensor:
    """z-depth of the nearest two-sided hit of each pixel-centre ray with a triangle mesh (0 where none).

    Rays start at the camera centre along K^-1 [j+0.5, i+0.5, 1]. Exact rasterization in homogeneous
    coordinates: for a triangle (v0, v1, v2) with e1 = v1 - v0, e2 = v2 - v0, n = e1 x e2 and det = v0 . n,
    a ray r hits it iff, with s = sign(det): s r.(e2 x v0) >= 0, s r.(v0 x e1) >= 0, s r.n >= the sum of
    those two, and s r.n > 0; the hit is at depth det / (r.n) * r_z. These are Moller-Trumbore's barycentric
    tests (u, v >= 0, u + v <= 1, t > 0) multiplied by det; each r.c is an affine function of the pixel
    coordinates, so no vertex is ever projected, and triangles crossing the camera plane or lying behind it
    need no special case (behind: the region is empty; crossing: its unbounded image is clipped to the
    screen).

    Vectorized: (triangle, pixel row) pairs over each triangle's row range (screen bbox of projected vertices
    when all are in front, all rows otherwise) -> exact column span of the triangle on the row (intersection
    of three half-lines, widened by one pixel) -> (triangle, pixel) candidates -> exact inside test ->
    z-buffer by ``scatter_reduce_(amin)``. Work is chunked to bound memory. Float64 throughout. Like the
    reference, triangles with |n| < 1e-8 (degenerate) are ignored; the reference additionally misses rays
    within |r.n| < 1e-8 |r| of grazing a triangle's plane, which this op may count as hits. Barycentrics
    down to -1e-9 count as inside (``EDGE_TOLERANCE``), so that pixel centres lying exactly on an edge
    shared by two triangles are not lost to rounding in both (no cracks).

    Args:
        vertices_cam: (V,3) vertices in the camera frame (OpenCV axes).
        faces: (M,3) integer vertex indices.
        K: (3,3) pinhole pixel intrinsics (last row [0, 0, 1]).
        height, width: image size.

    Returns:
        (H,W) z-depth in ``vertices_cam``'s dtype.
    """
    out_dtype = vertices_cam.dtype if isinstance(vertices_cam, Tensor) else torch.float32
    verts, faces, K = _check_mesh_inputs("mesh_depth", vertices_cam, faces, K, height, width)
    lib = warp_kernel.kernel()
    zbuf = torch.full((height * width,), torch.inf, dtype=torch.float64) if lib is None else None
    k_inv = torch.linalg.inv(K)
    if faces.shape[0]:
        v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
        e1, e2 = v1 - v0, v2 - v0
        n = torch.linalg.cross(e1, e2)
        det = (v0 * n).sum(-1)
        keep = (n.norm(dim=-1) >= MT_EPSILON) & (det != 0) & (torch.stack([v0, v1, v2])[..., 2].amax(0) > 0)
        if bool(keep.any()):
            idx = keep.nonzero()[:, 0]
            sign = torch.sign(det[idx])[:, None]
            # Affine forms in pixel coordinates: r(u,v).c = [u, v, 1] . (K^-T c) = [u, v, 1] . (c @ K^-1).
            e_1 = sign * (torch.linalg.cross(e2[idx], v0[idx]) @ k_inv)
            e_2 = sign * (torch.linalg.cross(v0[idx], e1[idx]) @ k_inv)
            e_d = sign * (n[idx] @ k_inv)
            rows = _row_ranges(torch.stack([v0[idx], v1[idx], v2[idx]], 1), K, height)
            if lib is None:
                _rasterize(e_1, e_2, e_d, det[idx].abs(), rows, height, width, zbuf)
            else:  # the same loops in C (``_warp_cpu.c``): a bit-identical z-buffer, holes already 0
                return _mesh_depth_kernel(lib, (e_1, e_2, e_d, det[idx].abs(), *rows), height, width, out_dtype)
    if zbuf is None:
        return _mesh_depth_kernel(lib, (), height, width, out_dtype)
    depth = torch.where(torch.isinf(zbuf), 0.0, zbuf).reshape(height, width)
    return depth.to(out_dtype if out_dtype.is_floating_point else torch.float32)


def _mesh_depth_kernel(lib, forms: tuple[Tensor, ...], height: int, width: int, out_dtype: torch.dtype) -> Tensor:
    """``mesh_depth``'s z-buffer by ``lyra_mesh_depth`` of the triangles' forms (e_1, e_2, e_d, |det|, row_lo,
    row_hi); no triangle when ``forms`` is empty."""
    if not forms:
        forms = (*(torch.zeros(0, 3, dtype=torch.float64) for _ in range(3)), torch.zeros(0, dtype=torch.float64),
                 *(torch.zeros(0, dtype=torch.long) for _ in range(2)))
    depth = torch.empty(height, width, dtype=torch.float64)
    tensors = [*(x.contiguous() for x in forms), depth, torch.tensor([EDGE_TOLERANCE], dtype=torch.float64)]
    lib.lyra_mesh_depth(warp_kernel.dims([forms[0].shape[0], height, width]), warp_kernel.ptrs(tensors),
                        torch.get_num_threads())
    return depth.to(out_dtype if out_dtype.is_floating_point else torch.float32)


def _row_ranges(tris: Tensor, K: Tensor, height: int) -> tuple[Tensor, Tensor]:
    """First and last pixel row (inclusive) that each triangle (M,3,3) can cover: the bbox of its projected
    vertices, widened by one row, when all vertices are in front of the camera; all rows otherwise."""
    proj = tris @ K.T  # (M,3,3): homogeneous pixel coordinates of the vertices
    w = proj[..., 2]
    in_front = (w > 0).all(dim=1)
    v = proj[..., 1] / torch.where(w > 0, w, 1.0)
    lo = torch.where(in_front, torch.ceil(v.amin(1).clamp(-2.0, height + 1.0) - 0.5) - 1, 0.0)
    hi = torch.where(in_front, torch.floor(v.amax(1).clamp(-2.0, height + 1.0) - 0.5) + 1, height - 1.0)
    return lo.clamp(0, height - 1).to(torch.long), hi.clamp(-1, height - 1).to(torch.long)


def _expand(counts: Tensor) -> tuple[Tensor, Tensor]:
    """For counts (P,) >= 0: (owner index, rank within owner) of each of the sum(counts) expanded items."""
    owner = torch.repeat_interleave(torch.arange(counts.shape[0]), counts)
    starts = torch.cumsum(counts, 0) - counts
    return owner, torch.arange(owner.shape[0]) - starts[owner]


def _chunks(counts: Tensor, budget: int) -> list[tuple[int, int]]:
    """Split items with these counts into consecutive [start, end) groups of total count <= budget (a single
    item may exceed it)."""
    ends = torch.cumsum(counts, 0)
    out, start, n = [], 0, counts.shape[0]
    while start < n:
        base = int(ends[start - 1]) if start else 0
        end = int(torch.searchsorted(ends, base + budget, right=True))
        end = max(end, start + 1)
        out.append((start, min(end, n)))
        start = end
    return out


def _rasterize(
    e_1: Tensor,
    e_2: Tensor,
    e_d: Tensor,
    abs_det: Tensor,
    rows: tuple[Tensor, Tensor],
    height: int,
    width: int,
    zbuf: Tensor,
) -> None:
    """Min-reduce the hit depths of the triangles (given by their sign-normalised affine forms) into zbuf."""
    row_lo, row_hi = rows
    row_counts = (row_hi - row_lo + 1).clamp(min=0)
    for t0, t1 in _chunks(row_counts, _PAIR_CHUNK):
        tri, rank = _expand(row_counts[t0:t1])
        tri += t0
        row = row_lo[tri] + rank
        v = row.to(torch.float64) + 0.5
        # Row-restricted forms a u + b for E1, E2, E0 = D - E1 - E2 and D.
        slopes = torch.stack([e_1[tri, 0], e_2[tri, 0], e_d[tri, 0] - e_1[tri, 0] - e_2[tri, 0]], 1)
        b_1 = e_1[tri, 1] * v + e_1[tri, 2]
        b_2 = e_2[tri, 1] * v + e_2[tri, 2]
        b_d = e_d[tri, 1] * v + e_d[tri, 2]
        icpts = torch.stack([b_1, b_2, b_d - b_1 - b_2], 1)
        # Column span: a u + b >= 0 for the three edges.
        bound = (-icpts / torch.where(slopes == 0, 1.0, slopes)).clamp(-2.0, width + 2.0)
        lo = torch.where(slopes > 0, bound, -2.0).amax(1)
        hi = torch.where(slopes < 0, bound, width + 2.0).amin(1)
        empty = ((slopes == 0) & (icpts < 0)).any(1)
        col_lo = (torch.ceil(lo - 0.5) - 1).clamp(0, width - 1).to(torch.long)
        col_hi = (torch.floor(hi - 0.5) + 1).clamp(-1, width - 1).to(torch.long)
        col_counts = torch.where(empty, 0, (col_hi - col_lo + 1).clamp(min=0))
        # Per pair: the forms' values at the first candidate column, their slopes, |det| and the pixel index;
        # a candidate at rank k of its pair is at column col_lo + k.
        u0 = col_lo.to(torch.float64) + 0.5
        per_pair = [
            slopes[:, 0],
            slopes[:, 0] * u0 + b_1,
            slopes[:, 1],
            slopes[:, 1] * u0 + b_2,
            e_d[tri, 0],
            e_d[tri, 0] * u0 + b_d,
            abs_det[tri],
            (row * width + col_lo).to(torch.float64),
        ]
        for p0, p1 in _chunks(col_counts, _CANDIDATE_CHUNK):
            pair, rank = _expand(col_counts[p0:p1])
            pair += p0
            a1, w1, a2, w2, ad, d, zn, pix = (x.index_select(0, pair) for x in per_pair)
            k = rank.to(torch.float64)
            w1 += a1 * k
            w2 += a2 * k
            d += ad * k
            # Barycentrics w / d >= -EDGE_TOLERANCE: closes the cracks that rounding opens along shared edges
            # through pixel centres (each triangle evaluates the shared edge from its own vertices).
            slack = d * EDGE_TOLERANCE
            inside = (w1 >= -slack) & (w2 >= -slack) & (d - w1 - w2 >= -slack) & (d > 0)
            hit = inside.nonzero()[:, 0]
            # Hit at s r with s = det / (r.n); its z-depth is s r_z = s since K's last row is [0, 0, 1].
            zbuf.scatter_reduce_(0, (pix[hit] + k[hit]).to(torch.long), zn[hit] / d[hit], "amin")


# ------------------------------------------------------------------------------------------------ reference


def mesh_depth_reference(
    vertices_cam: Tensor, faces: Tensor, K: Tensor, height: int, width: int, *, tile: int = 1 << 21
) -> Tensor:
    """Reference of ``mesh_depth``: brute-force two-sided Moller-Trumbore of every pixel-centre ray against
    every triangle (eps 1e-8, nearest t > eps, z = t * unit_dir_z), float64, tiled over rays x triangles so
    that a tile holds about ``tile`` ray-triangle pairs. Returns (H,W) in ``vertices_cam``'s dtype."""
    out_dtype = vertices_cam.dtype if isinstance(vertices_cam, Tensor) else torch.float32
    verts, faces, K = _check_mesh_inputs("mesh_depth_reference", vertices_cam, faces, K, height, width)
    rays = _pixel_rays(K, height, width)
    dirs = rays / rays.norm(dim=-1, keepdim=True)
    best = torch.full((dirs.shape[0],), torch.inf, dtype=torch.float64)
    n_tri = faces.shape[0]
    tri_tile = max(1, min(n_tri, 1024))
    ray_tile = max(1, tile // tri_tile)
    for t0 in range(0, n_tri, tri_tile):
        f = faces[t0 : t0 + tri_tile]
        v0, v1, v2 = verts[f[:, 0]], verts[f[:, 1]], verts[f[:, 2]]
        e1, e2 = (v1 - v0)[None], (v2 - v0)[None]  # (1,T,3)
        tvec = -v0[None]  # ray origin (0,0,0) minus v0
        qvec = torch.linalg.cross(tvec, e1)  # (1,T,3)
        for r0 in range(0, dirs.shape[0], ray_tile):
            d = dirs[r0 : r0 + ray_tile, None, :]  # (R,1,3)
            pvec = torch.linalg.cross(d.expand(-1, e2.shape[1], -1), e2.expand(d.shape[0], -1, -1))
            det = (e1 * pvec).sum(-1)  # (R,T)
            ok = det.abs() >= MT_EPSILON
            inv_det = 1.0 / torch.where(ok, det, 1.0)
            u = (tvec * pvec).sum(-1) * inv_det
            v = (d * qvec).sum(-1) * inv_det
            t = (e2 * qvec).sum(-1) * inv_det
            hit = ok & (u >= 0) & (u <= 1) & (v >= 0) & (u + v <= 1) & (t > MT_EPSILON)
            t_hit = torch.where(hit, t, torch.inf).amin(1)
            best[r0 : r0 + ray_tile] = torch.minimum(best[r0 : r0 + ray_tile], t_hit)
    z = torch.where(torch.isinf(best), 0.0, best * dirs[:, 2]).reshape(height, width)
    return z.to(out_dtype if out_dtype.is_floating_point else torch.float32)


# ------------------------------------------------------------------------------------------------ refinement


def refine_mask_conservative(
    warp: WarpResult,
    points_world: Tensor,
    boundary: Tensor,
    w2c_tgt: Tensor,
    K_tgt: Tensor,
    *,
    threshold: float = 0.02,
    factor: int = 4,
    method: str = "fast",
    hole_value: float = -1.0,
) -> WarpResult:
    """Invalidate warped pixels that lie behind the seam surface of the source view (spec 1.7).

    Per target frame f: the seam mesh of the source points (``seam_mesh`` of ``points_world`` and
    ``boundary``) is moved into camera f and ray-cast (``mesh_depth``); a pixel is invalidated iff z_mesh > 0
    and z_mesh + threshold < warped depth. Invalidated pixels get mask False, rgb ``hole_value`` and depth 0.
    Frames are independent: the result for a frame does not depend on the others.

    Args:
        warp: ``WarpResult`` of ``forward_warp`` with F frames of size H x W.
        points_world: (H,W,3) world points of the source pixels (``unproject_depth``).
        boundary: (H,W) bool seam pixels, Lyra's ``~depth_reliability_mask(depth)``.
        w2c_tgt: (F,4,4) or (4,4) target world-to-camera poses (those of the warp).
        K_tgt: (F,3,3) or (3,3) target intrinsics.
        threshold: depth margin (scene units).
        factor: mesh downsampling factor.
        method: "fast" (``mesh_depth``) or "reference" (``mesh_depth_reference``).
        hole_value: colour of invalidated pixels.

    Returns:
        A new ``WarpResult``; the input is not modified.
    """
    fn = "refine_mask_conservative"
    if not isinstance(warp, WarpResult):
        raise LyraInputError(f"{fn}: warp must be a WarpResult, got {type(warp).__name__}")
    n_frames, _, h, w = warp.rgb.shape
    points_world = _check_tensor(points_world, fn, "points_world")
    if tuple(points_world.shape) != (h, w, 3):
        raise LyraInputError(
            f"{fn}: points_world must have shape (H, W, 3) = {(h, w, 3)} like the warp, "
            f"got {tuple(points_world.shape)}"
        )
    boundary = _check_tensor(boundary, fn, "boundary")
    if tuple(boundary.shape) != (h, w) or boundary.dtype != torch.bool:
        raise LyraInputError(
            f"{fn}: boundary must be a bool tensor of shape (H, W) = {(h, w)}, "
            f"got {boundary.dtype} {tuple(boundary.shape)}"
        )
    w2c = _batch(w2c_tgt, fn, "w2c_tgt", 4, n_frames)
    Ks = _batch(K_tgt, fn, "K_tgt", 3, n_frames)
    if method not in ("fast", "reference"):
        raise LyraInputError(f"{fn}: method must be 'fast' or 'reference', got {method!r}")
    cast = mesh_depth if method == "fast" else mesh_depth_reference

    vertices, faces = seam_mesh(points_world.detach().to(torch.float64), boundary, factor)
    if faces.shape[0] == 0:
        return WarpResult(warp.rgb.clone(), warp.depth.clone(), warp.mask.clone())
    lib = warp_kernel.kernel()
    if lib is not None and warp.rgb.dtype == warp.depth.dtype == torch.float32:
        # One pass per frame in C (``lyra_refine_apply``): copy and invalidate together, no full-frame clone.
        ins = [warp.rgb.contiguous(), warp.depth.contiguous(), warp.mask.contiguous()]
        outs = [torch.empty_like(x) for x in ins]
        params = torch.tensor([float(threshold), float(hole_value)], dtype=torch.float64)
        c = warp.rgb.shape[1]
        for f in range(n_frames):
            R, t = w2c[f, :3, :3], w2c[f, :3, 3]
            z_mesh = cast(vertices @ R.T + t, faces, Ks[f], h, w).to(torch.float64).contiguous()
            lib.lyra_refine_apply(warp_kernel.dims([c, h * w]),
                                  warp_kernel.ptrs([z_mesh, *(x[f] for x in ins), *(x[f] for x in outs), params]))
        return WarpResult(*outs)
    rgb, depth, mask = warp.rgb.clone(), warp.depth.clone(), warp.mask.clone()
    for f in range(n_frames):
        R, t = w2c[f, :3, :3], w2c[f, :3, 3]
        verts_cam = vertices @ R.T + t
        z_mesh = cast(verts_cam, faces, Ks[f], h, w)
        invalid = (z_mesh > 0) & (z_mesh + threshold < depth[f, 0].to(torch.float64))
        mask[f, 0] &= ~invalid
        rgb[f][:, invalid] = hole_value
        depth[f, 0][invalid] = 0.0
    return WarpResult(rgb, depth, mask)


def _batch(x: object, fn: str, name: str, size: int, n_frames: int) -> Tensor:
    x = _check_tensor(x, fn, name)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or tuple(x.shape[1:]) != (size, size) or x.shape[0] not in (1, n_frames):
        raise LyraInputError(
            f"{fn}: {name} must have shape ({n_frames}, {size}, {size}) (one per warped frame) or "
            f"({size}, {size}), got {tuple(x.shape)}"
        )
    return x.detach().to(torch.float64).expand(n_frames, size, size)
