"""Validated pinhole camera batches (OpenCV convention) and their conversions.

Convention used by the whole project: OpenCV axes (x right, y down, z forward), poses stored as camera-to-world
(c2w) matrices, intrinsics in pixels, and pixel (row i, col j) centred at continuous image coordinates
(j + 0.5, i + 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lyra_ops.errors import LyraInputError

# Rotation part must satisfy |R^T R - I| < tol and det(R) ~ 1 (float32 poses from files drift ~1e-6).
SE3_TOLERANCE = 1e-3
OPENCV_TO_OPENGL = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))


def check_se3(matrices: torch.Tensor, *, name: str = "c2w", source: str = "", tol: float = SE3_TOLERANCE) -> None:
    """Raise ``LyraInputError`` naming the first offending frame if ``matrices`` (N,4,4) is not a rigid pose batch."""
    where = f"{source}: " if source else ""
    if matrices.ndim != 3 or matrices.shape[-2:] != (4, 4):
        raise LyraInputError(f"{where}{name} must have shape (N, 4, 4), got {tuple(matrices.shape)}")
    m = matrices.detach().to(torch.float64)
    finite = torch.isfinite(m).flatten(1).all(dim=1)
    if not bool(finite.all()):
        frame = int((~finite).nonzero()[0])
        raise LyraInputError(f"{where}{name}[{frame}] contains NaN or Inf values")
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    bad_row = (m[:, 3, :] - bottom).abs().amax(dim=1) > tol
    if bool(bad_row.any()):
        frame = int(bad_row.nonzero()[0])
        raise LyraInputError(
            f"{where}{name}[{frame}] last row must be [0, 0, 0, 1], got {m[frame, 3].tolist()}"
        )
    rot = m[:, :3, :3]
    ortho_err = (rot.transpose(1, 2) @ rot - torch.eye(3, dtype=torch.float64)).abs().flatten(1).amax(dim=1)
    det = torch.linalg.det(rot)
    bad = (ortho_err > tol) | ((det - 1.0).abs() > tol)
    if bool(bad.any()):
        frame = int(bad.nonzero()[0])
        raise LyraInputError(
            f"{where}{name}[{frame}] is not a rigid transform (SE(3)): rotation block has "
            f"|R^T R - I| = {float(ortho_err[frame]):.3g} and det = {float(det[frame]):.6g} "
            f"(expected an orthonormal rotation with det +1, tolerance {tol})"
        )


def invert_se3(matrices: torch.Tensor) -> torch.Tensor:
    """Exact inverse of rigid transforms (N,4,4): [R|t]^-1 = [R^T | -R^T t]."""
    rot = matrices[..., :3, :3]
    trans = matrices[..., :3, 3:]
    out = torch.zeros_like(matrices)
    out[..., :3, :3] = rot.transpose(-1, -2)
    out[..., :3, 3:] = -rot.transpose(-1, -2) @ trans
    out[..., 3, 3] = 1.0
    return out


def intrinsics_matrix(fx: torch.Tensor, fy: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Build (N,3,3) pixel intrinsics from per-frame focal lengths and principal points."""
    fx, fy, cx, cy = torch.broadcast_tensors(
        torch.as_tensor(fx), torch.as_tensor(fy), torch.as_tensor(cx), torch.as_tensor(cy)
    )
    k = torch.zeros(fx.shape + (3, 3), dtype=fx.dtype)
    k[..., 0, 0] = fx
    k[..., 1, 1] = fy
    k[..., 0, 2] = cx
    k[..., 1, 2] = cy
    k[..., 2, 2] = 1.0
    return k


def default_intrinsics(height: int, width: int, hfov_deg: float = 65.0) -> torch.Tensor:
    """Square-pixel intrinsics (3,3) float32 with a centred principal point (W/2, H/2) and horizontal FOV."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LyraInputError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(hfov_deg, int | float) or not math.isfinite(hfov_deg) or not 0.0 < hfov_deg < 180.0:
        raise LyraInputError(f"hfov_deg must be a finite number of degrees in (0, 180), got {hfov_deg!r}")
    focal = (width / 2.0) / math.tan(math.radians(hfov_deg) / 2.0)
    k = torch.tensor([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return k.float()


@dataclass(frozen=True)
class Cameras:
    """A batch of N pinhole cameras: c2w (N,4,4) OpenCV poses and K (N,3,3) pixel intrinsics at height x width."""

    c2w: torch.Tensor
    K: torch.Tensor
    height: int
    width: int

    def __post_init__(self) -> None:
        if not isinstance(self.height, int) or not isinstance(self.width, int) or self.height <= 0 or self.width <= 0:
            raise LyraInputError(
                f"Cameras: height and width must be positive ints, got {self.height!r} x {self.width!r}"
            )
        check_se3(self.c2w, name="c2w")
        k = self.K
        if k.ndim != 3 or k.shape[-2:] != (3, 3) or k.shape[0] != self.c2w.shape[0]:
            raise LyraInputError(
                f"Cameras: K must have shape (N, 3, 3) with N = {self.c2w.shape[0]} (one per c2w), "
                f"got {tuple(k.shape)}"
            )
        if not bool(torch.isfinite(k).all()):
            frame = int((~torch.isfinite(k)).flatten(1).any(dim=1).nonzero()[0])
            raise LyraInputError(f"Cameras: K[{frame}] contains NaN or Inf values")
        bad = (k[:, 0, 0] <= 0) | (k[:, 1, 1] <= 0)
        if bool(bad.any()):
            frame = int(bad.nonzero()[0])
            raise LyraInputError(
                f"Cameras: K[{frame}] must have positive focal lengths, got fx={float(k[frame, 0, 0])}, "
                f"fy={float(k[frame, 1, 1])}"
            )

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_w2c(cls, w2c: torch.Tensor, K: torch.Tensor, height: int, width: int) -> Cameras:
        check_se3(w2c, name="w2c")
        return cls(invert_se3(w2c.to(torch.float64)).to(w2c.dtype), K, height, width)

    @classmethod
    def from_opengl(cls, c2w_gl: torch.Tensor, K: torch.Tensor, height: int, width: int) -> Cameras:
        """From OpenGL/Blender c2w (x right, y up, z backward)."""
        flip = OPENCV_TO_OPENGL.to(c2w_gl.dtype)
        return cls(c2w_gl @ flip, K, height, width)

    # --- views ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.c2w.shape[0])

    def __getitem__(self, index: int | slice | torch.Tensor) -> Cameras:
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Cameras(self.c2w[index], self.K[index], self.height, self.width)

    @property
    def w2c(self) -> torch.Tensor:
        return invert_se3(self.c2w.to(torch.float64)).to(self.c2w.dtype)

    @property
    def centers(self) -> torch.Tensor:
        """Camera centres in world coordinates (N,3)."""
        return self.c2w[:, :3, 3]

    def to_opengl(self) -> torch.Tensor:
        """c2w in OpenGL/Blender convention (x right, y up, z backward)."""
        return self.c2w @ OPENCV_TO_OPENGL.to(self.c2w.dtype)

    @property
    def fxfycxcy(self) -> torch.Tensor:
        """(N,4) [fx, fy, cx, cy] in pixels, Lyra's on-disk intrinsics layout."""
        return torch.stack([self.K[:, 0, 0], self.K[:, 1, 1], self.K[:, 0, 2], self.K[:, 1, 2]], dim=-1)

    def normalized_intrinsics(self) -> torch.Tensor:
        """(N,3,3) intrinsics divided by image size (fx/W, fy/H, cx/W, cy/H), resolution independent."""
        scale = torch.tensor([1.0 / self.width, 1.0 / self.height, 1.0], dtype=self.K.dtype)
        return self.K * scale[None, :, None]

    def resized(self, height: int, width: int) -> Cameras:
        """Same cameras for an image resized (not cropped) to height x width."""
        sx, sy = width / self.width, height / self.height
        k = self.K.clone()
        k[:, 0, :] *= sx
        k[:, 1, :] *= sy
        return Cameras(self.c2w, k, height, width)

    def to(self, dtype: torch.dtype) -> Cameras:
        return Cameras(self.c2w.to(dtype), self.K.to(dtype), self.height, self.width)
