"""Pure array conversions from Lyra's 3D Gaussians to OpenUSD's ``ParticleField3DGaussianSplat`` layout.

No I/O and no ``pxr``: ``lyra_pipeline.usd_export`` writes what these functions return.

Frames. Lyra's world frame is the first input camera's OpenCV frame (:mod:`lyra_ops.cameras`: x right, y down,
z forward; metres). USD stages are Y-up (``upAxis = "Y"``) and right-handed, so the export rotates the scene by
180 degrees about x, ``p_usd = OPENCV_TO_Y_UP @ p_lyra`` with ``OPENCV_TO_Y_UP = diag(1, -1, -1)`` (the same flip as
OpenCV -> OpenGL camera axes): x stays right, y becomes up, and the input camera looks along -z, as a USD camera
does. It is a proper rotation, so each Gaussian's rotation becomes ``q_usd = q_flip * q_lyra`` (Hamilton product,
``q_flip = (0, 1, 0, 0)`` in (w, x, y, z)), its scales are unchanged, and SH coefficients of odd total degree in y
and z change sign (:func:`sh_axis_flip_signs`; degree 0, all Lyra writes, is unchanged). Omniverse's NuRec volumes
live in Z-up stages: :data:`OPENCV_TO_Z_UP` maps (x, y, z) -> (x, z, -y) (90 degrees about x).

USD's value conventions (``pxr/usd/usdVol/schema.usda``, usd-core 26): positions in the prim's space; linear
``scales`` (not the PLY's log scales); ``opacities`` in [0, 1] (not the PLY's logits); ``orientations`` quaternions
(``GfQuatf``: real part first when constructed, but stored -- and exchanged with numpy -- as (x, y, z, w));
``radiance:sphericalHarmonicsCoefficients`` flattened per particle, ``(degree + 1)^2`` float3 each, holding the
3DGS SH coefficients (the PLY's ``f_dc``: colour = 0.5 + SH_C0 * f_dc), 3DGS's coefficient order (degree by degree,
as NVIDIA 3DGRUT's ParticleField writer stores them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lyra_ops.errors import LyraInputError
from lyra_ops.gaussians import SH_C0

OPENCV_TO_Y_UP = np.diag([1.0, -1.0, -1.0])
OPENCV_TO_Z_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
# Per SH basis function (3DGS order, degrees 0..3), the parities of its x, y and z exponents: a diagonal flip
# diag(sx, sy, sz) multiplies the function by sx^px * sy^py * sz^pz.
SH_PARITY = np.array([
    (0, 0, 0),                                                             # 1
    (0, 1, 0), (0, 0, 1), (1, 0, 0),                                       # y, z, x
    (1, 1, 0), (0, 1, 1), (0, 0, 0), (1, 0, 1), (0, 0, 0),                 # xy, yz, 3z^2-1, xz, x^2-y^2
    (0, 1, 0), (1, 1, 1), (0, 1, 0), (0, 0, 1), (1, 0, 0), (0, 0, 1), (1, 0, 0),  # y(3x^2-y^2) .. x(x^2-3y^2)
])  # fmt: skip
MAX_SH_DEGREE = 3
# How far a Gaussian's support reaches in standard deviations, for the extent (the schema: 99.7% within 3).
EXTENT_SIGMAS = 3.0


def _rotation(R: np.ndarray) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.shape != (3, 3) or not np.allclose(R.T @ R, np.eye(3), atol=1e-9) or not np.isclose(np.linalg.det(R), 1.0):
        raise LyraInputError(f"frame change must be a proper 3x3 rotation, got {R.tolist()}")
    return R


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product ``a * b`` of (..., 4) quaternions in (w, x, y, z) order (``a`` applied after ``b``)."""
    aw, ax, ay, az = np.moveaxis(np.asarray(a, dtype=np.float64), -1, 0)
    bw, bx, by, bz = np.moveaxis(np.asarray(b, dtype=np.float64), -1, 0)
    return np.stack([aw * bw - ax * bx - ay * by - az * bz,
                     aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx,
                     aw * bz + ax * by - ay * bx + az * bw], axis=-1)


def quat_from_rotation(R: np.ndarray) -> np.ndarray:
    """The unit quaternion (w, x, y, z), w >= 0, of a proper rotation matrix (3, 3)."""
    R = _rotation(R)
    tr = np.trace(R)
    candidates = [(1.0 + tr, (R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]), 0),
                  (1.0 + R[0, 0] - R[1, 1] - R[2, 2], (R[2, 1] - R[1, 2], R[0, 1] + R[1, 0], R[0, 2] + R[2, 0]), 1),
                  (1.0 - R[0, 0] + R[1, 1] - R[2, 2], (R[0, 2] - R[2, 0], R[0, 1] + R[1, 0], R[1, 2] + R[2, 1]), 2),
                  (1.0 - R[0, 0] - R[1, 1] + R[2, 2], (R[1, 0] - R[0, 1], R[0, 2] + R[2, 0], R[1, 2] + R[2, 1]), 3)]
    big, others, which = max(candidates, key=lambda c: c[0])  # Shepperd: divide by the largest component
    s = 2.0 * np.sqrt(big)
    q = np.empty(4)
    q[which] = s / 4.0
    q[[i for i in range(4) if i != which]] = np.asarray(others) / s
    return q if q[0] >= 0 else -q


def quat_to_rotation(q: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) of (..., 4) quaternions (w, x, y, z), normalised first."""
    q = np.asarray(q, dtype=np.float64)
    w, x, y, z = np.moveaxis(q / np.linalg.norm(q, axis=-1, keepdims=True), -1, 0)
    return np.stack([np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
                     np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
                     np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1)], -2)


def wxyz_to_xyzw(q: np.ndarray) -> np.ndarray:
    """(w, x, y, z) -> (x, y, z, w): the memory order of ``GfQuatf`` arrays (``Vt.QuatfArray.FromNumpy``)."""
    q = np.asarray(q)
    return np.concatenate([q[..., 1:], q[..., :1]], axis=-1)


def xyzw_to_wxyz(q: np.ndarray) -> np.ndarray:
    """Inverse of :func:`wxyz_to_xyzw`."""
    q = np.asarray(q)
    return np.concatenate([q[..., 3:], q[..., :3]], axis=-1)


def sh_degree_of(count: int) -> int:
    """The SH degree whose (degree + 1)^2 coefficients make ``count`` (0..3), else one clear error."""
    for degree in range(MAX_SH_DEGREE + 1):
        if (degree + 1) ** 2 == count:
            return degree
    raise LyraInputError(f"SH coefficients per Gaussian: expected 1, 4, 9 or 16 (degree 0..3), got {count}")


def sh_from_colors(colors: np.ndarray) -> np.ndarray:
    """Degree-0 SH coefficients (M, 1, 3) of RGB colours (M, 3) in [0, 1]: (rgb - 0.5) / SH_C0, the PLY's f_dc."""
    return ((np.asarray(colors, dtype=np.float64) - 0.5) / SH_C0)[:, None, :]


def sh_axis_flip_signs(degree: int, flips) -> np.ndarray:
    """Signs (K,) that carry SH coefficients of ``degree`` (3DGS order) through the rotation diag(``flips``)
    (each +-1, their product +1): f'(D d) = f(d) for every direction d when c'_k = sign_k * c_k."""
    flips = np.asarray(flips, dtype=np.float64)
    if flips.shape != (3,) or not np.all(np.abs(flips) == 1) or np.prod(flips) != 1:
        raise LyraInputError(f"SH axis flips: expected three +-1 values with product +1, got {flips.tolist()}")
    if not 0 <= degree <= MAX_SH_DEGREE:
        raise LyraInputError(f"SH degree: expected 0..{MAX_SH_DEGREE}, got {degree}")
    return np.prod(flips[None, :] ** SH_PARITY[: (degree + 1) ** 2], axis=1)


def flatten_sh(sh: np.ndarray) -> np.ndarray:
    """(M, K, 3) per-Gaussian coefficients -> USD's flat (M * K, 3) array (each particle's K contiguous)."""
    sh = np.asarray(sh)
    if sh.ndim != 3 or sh.shape[2] != 3:
        raise LyraInputError(f"SH coefficients must have shape (M, K, 3), got {sh.shape}")
    sh_degree_of(sh.shape[1])
    return sh.reshape(-1, 3)


def unflatten_sh(flat: np.ndarray, degree: int) -> np.ndarray:
    """USD's flat (M * K, 3) coefficients of ``degree`` -> (M, K, 3)."""
    k = (degree + 1) ** 2
    flat = np.asarray(flat)
    if flat.ndim != 2 or flat.shape[1] != 3 or flat.shape[0] % k:
        raise LyraInputError(f"flat SH coefficients of degree {degree} must have shape (M * {k}, 3), got {flat.shape}")
    return flat.reshape(-1, k, 3)


def gaussian_extent(means: np.ndarray, quats: np.ndarray, scales: np.ndarray,
                    sigmas: float = EXTENT_SIGMAS) -> np.ndarray:
    """Axis-aligned box (2, 3) [min, max] holding every Gaussian's ``sigmas``-standard-deviation ellipsoid: per
    axis i, centre +- sigmas * sqrt(sum_j (R_ij s_j)^2). No Gaussians: a zero box at the origin."""
    means = np.asarray(means, dtype=np.float64)
    if means.shape[0] == 0:
        return np.zeros((2, 3))
    half = sigmas * np.linalg.norm(quat_to_rotation(quats) * np.asarray(scales, dtype=np.float64)[:, None, :],
                                   axis=2)
    return np.stack([(means - half).min(axis=0), (means + half).max(axis=0)])


@dataclass(frozen=True)
class ParticleArrays:
    """One Gaussian set in USD's frame and units, named after the schema's attributes: ``positions`` (M, 3),
    ``orientations`` (M, 4) unit quaternions (w, x, y, z) (use :func:`wxyz_to_xyzw` for ``Vt.QuatfArray``),
    ``scales`` (M, 3) linear standard deviations, ``opacities`` (M,) in [0, 1], ``sh`` (M, K, 3) SH coefficients of
    ``sh_degree`` (K = (degree + 1)^2), and ``extent`` (2, 3) bounding every Gaussian (:func:`gaussian_extent`)."""

    positions: np.ndarray
    orientations: np.ndarray
    scales: np.ndarray
    opacities: np.ndarray
    sh: np.ndarray
    sh_degree: int
    extent: np.ndarray

    @property
    def count(self) -> int:
        return int(self.positions.shape[0])


def to_usd_frame(means, quats, scales, opacities, sh, rotation: np.ndarray = OPENCV_TO_Y_UP) -> ParticleArrays:
    """Lyra's Gaussians (world = first camera's OpenCV frame; quaternions (w, x, y, z); linear scales; opacities
    in [0, 1]; SH coefficients (M, K, 3), e.g. :func:`sh_from_colors`) -> :class:`ParticleArrays` in the frame
    ``p' = rotation @ p`` (default :data:`OPENCV_TO_Y_UP`). Higher-degree SH need a diagonal ``rotation``."""
    R = _rotation(rotation)
    means = np.asarray(means, dtype=np.float64)
    m = means.shape[0]
    quats = np.asarray(quats, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    opacities = np.asarray(opacities, dtype=np.float64)
    sh = np.asarray(sh, dtype=np.float64)
    for name, value, shape in (("means", means, (m, 3)), ("quats", quats, (m, 4)), ("scales", scales, (m, 3)),
                               ("opacities", opacities, (m,))):
        if value.shape != shape:
            raise LyraInputError(f"{name} must have shape {shape}, got {value.shape}")
    if sh.ndim != 3 or sh.shape[0] != m or sh.shape[2] != 3:
        raise LyraInputError(f"sh must have shape ({m}, K, 3), got {sh.shape}")
    degree = sh_degree_of(sh.shape[1])
    if degree > 0:
        if not np.allclose(R, np.diag(np.diag(R))):
            raise LyraInputError("SH of degree > 0 can only be carried through an axis-flip rotation here, got "
                                 f"{R.tolist()}")
        sh = sh * sh_axis_flip_signs(degree, np.diag(R).round())[None, :, None]
    quats = quats / np.linalg.norm(quats, axis=1, keepdims=True)
    orientations = quat_multiply(quat_from_rotation(R)[None, :], quats)
    positions = means @ R.T
    return ParticleArrays(positions, orientations, scales, opacities, sh, degree,
                          gaussian_extent(positions, orientations, scales))
