"""The 3D Gaussian container produced by the 3DGS decoder, with Lyra's pruning and standard 3DGS PLY I/O.

Parametrisation (Lyra, spec section 4.7): means (M,3) world units, scales (M,3) *linear* standard
deviations (not log), quats (M,4) unit quaternions in (w, x, y, z) order, opacities (M,) activated in [0, 1],
colors (M,3) RGB in [0, 1] used directly (degree 0 only, no spherical harmonics).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from lyra_ops.errors import LyraInputError, LyraNonFiniteError

# Zeroth-order real spherical-harmonic constant: rgb = 0.5 + SH_C0 * f_dc (standard 3DGS PLY convention).
SH_C0 = 0.28209479177387814
# Lyra writes log(scale + 1e-8) so that zero scales stay finite in the PLY.
PLY_LOG_SCALE_EPS = 1e-8
# Opacities are clamped into (eps, 1 - eps) before the logit so that 0 and 1 stay finite (gsplat's exporter
# silently drops rows with non-finite values).
PLY_OPACITY_EPS = 1e-7
# A quaternion with a smaller norm than this has no defined rotation.
MIN_QUAT_NORM = 1e-12
# PLY layouts: ``compact`` (gsplat's: x y z f_dc opacity scale rot) or ``inria`` (the original 3DGS code's: with
# normals nx ny nz and 45 f_rest coefficients of degree-3 SH, all zero here), for loaders that expect every field.
PLY_LAYOUTS = ("compact", "inria")
INRIA_REST = 45

_FIELD_WIDTH = {"means": 3, "scales": 3, "quats": 4, "colors": 3}
_PLY_TYPES = {
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
    "uchar": "u1", "uint8": "u1", "char": "i1", "int8": "i1",
    "ushort": "u2", "uint16": "u2", "short": "i2", "int16": "i2",
    "uint": "u4", "uint32": "u4", "int": "i4", "int32": "i4",
}  # fmt: skip


@dataclass(eq=False)
class Gaussians:
    """A set of M 3D Gaussians (see the module docstring for the parametrisation).

    ``quats`` are normalised on construction (so gradients flow through the normalisation to the tensor that
    was passed in). All tensors must share one device and one floating dtype.
    """

    means: torch.Tensor
    scales: torch.Tensor
    quats: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor

    def __post_init__(self) -> None:
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise LyraInputError(f"Gaussians.{name} must be a torch.Tensor, got {type(value).__name__}")
            if not value.is_floating_point():
                raise LyraInputError(
                    f"Gaussians.{name} must be a floating-point tensor, got dtype {value.dtype}"
                )
        if self.means.ndim != 2 or self.means.shape[1] != 3:
            raise LyraInputError(f"Gaussians.means must have shape (M, 3), got {tuple(self.means.shape)}")
        m = self.means.shape[0]
        for name, width in _FIELD_WIDTH.items():
            shape = tuple(tensors[name].shape)
            if shape != (m, width):
                raise LyraInputError(
                    f"Gaussians.{name} must have shape (M, {width}) = ({m}, {width}) to match means, "
                    f"got {shape}"
                )
        if tuple(self.opacities.shape) != (m,):
            hint = " (squeeze the trailing 1)" if tuple(self.opacities.shape) == (m, 1) else ""
            raise LyraInputError(
                f"Gaussians.opacities must have shape (M,) = ({m},), got {tuple(self.opacities.shape)}{hint}"
            )
        device, dtype = self.means.device, self.means.dtype
        for name, value in tensors.items():
            if value.device != device or value.dtype != dtype:
                raise LyraInputError(
                    f"Gaussians.{name} is {value.dtype} on {value.device} but means is {dtype} on {device}: "
                    "all fields must share one dtype and device"
                )
        for name, value in tensors.items():
            finite = torch.isfinite(value.detach())
            if not bool(finite.all()):
                row = int((~finite).reshape(m, -1).any(dim=1).nonzero()[0])
                raise LyraNonFiniteError(f"Gaussians.{name}[{row}] contains NaN or Inf values")
        if m and bool((self.scales.detach() < 0).any()):
            row = int((self.scales.detach() < 0).any(dim=1).nonzero()[0])
            raise LyraInputError(
                f"Gaussians.scales must be linear (>= 0) standard deviations, got "
                f"{self.scales[row].tolist()} at row {row} (did you pass log-scales? use scales.exp())"
            )
        if m:
            op = self.opacities.detach()
            bad = (op < 0) | (op > 1)
            if bool(bad.any()):
                row = int(bad.nonzero()[0])
                raise LyraInputError(
                    f"Gaussians.opacities must be activated values in [0, 1], got {float(op[row]):.6g} "
                    f"at row {row} (did you pass logits? use torch.sigmoid)"
                )
            norm = self.quats.norm(dim=-1, keepdim=True)
            small = norm.detach().squeeze(1) < MIN_QUAT_NORM
            if bool(small.any()):
                row = int(small.nonzero()[0])
                raise LyraInputError(
                    f"Gaussians.quats[{row}] = {self.quats[row].tolist()} has (near) zero norm; expected a "
                    "quaternion (w, x, y, z) with non-zero norm"
                )
            self.quats = self.quats / norm

    @property
    def num(self) -> int:
        """Number of Gaussians M."""
        return int(self.means.shape[0])

    @property
    def device(self) -> torch.device:
        """Device of every field."""
        return self.means.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of every field."""
        return self.means.dtype

    def _map(self, fn) -> Gaussians:
        return Gaussians(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Gaussians:
        """Copy to another device and/or floating dtype (differentiable, like ``Tensor.to``)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def detach(self) -> Gaussians:
        """The same Gaussians cut from the autograd graph."""
        return self._map(lambda t: t.detach())

    def index(self, idx: torch.Tensor) -> Gaussians:
        """Select Gaussians by an index or boolean mask over M."""
        return self._map(lambda t: t[idx])

    @classmethod
    def cat(cls, items: Sequence[Gaussians]) -> Gaussians:
        """Concatenate several sets (e.g. the per-view Gaussians Lyra fuses) into one."""
        items = list(items)
        if not items:
            raise LyraInputError("Gaussians.cat needs at least one Gaussians, got an empty sequence")
        for i, item in enumerate(items):
            if not isinstance(item, Gaussians):
                raise LyraInputError(
                    f"Gaussians.cat: item {i} is a {type(item).__name__}, expected Gaussians"
                )
        return cls(**{f.name: torch.cat([getattr(g, f.name) for g in items], dim=0) for f in fields(cls)})

    def prune_by_opacity(self, keep_fraction: float) -> Gaussians:
        """Lyra's pruning (spec 4.8): keep the floor(M * keep_fraction) most opaque Gaussians.

        With prune ratio p, ``keep_fraction = 1 - p``. The result is ordered by decreasing opacity (ties
        keep their original order), as in Lyra's ``gaussian_pruning``.
        """
        if not 0.0 <= float(keep_fraction) <= 1.0:
            raise LyraInputError(f"prune_by_opacity: keep_fraction must be in [0, 1], got {keep_fraction}")
        keep = math.floor(self.num * float(keep_fraction))
        order = torch.sort(self.opacities.detach(), descending=True, stable=True).indices[:keep]
        return self.index(order)

    def smoothed(self, centre: torch.Tensor, focal: float, variance_px2: float) -> Gaussians:
        """Mip-Splatting's 3D smoothing filter, baked in: every scale widened to sqrt(s^2 + v (d / f)^2), with d the
        Gaussian's distance from ``centre`` (the camera the scene was built for, e.g. the input camera), f that
        camera's focal length in pixels and v = ``variance_px2``; opacities unchanged (as the rasterizer's own
        screen-space dilation). At the camera's resolution this adds what a renderer's 0.3 px^2 dilation adds;
        in a larger window, Gaussians sized for one pixel of the input (the decoder's per-pixel input head)
        still close up instead of leaving the background visible between them. ``variance_px2`` 0: unchanged."""
        if not (isinstance(variance_px2, int | float) and math.isfinite(variance_px2) and variance_px2 >= 0):
            raise LyraInputError(f"smoothed: variance_px2 must be a number >= 0, got {variance_px2!r}")
        if not (math.isfinite(focal) and focal > 0):
            raise LyraInputError(f"smoothed: focal must be a positive number of pixels, got {focal!r}")
        if variance_px2 == 0:
            return self
        d = (self.means - centre.to(self.means)).norm(dim=-1, keepdim=True)
        scales = torch.sqrt(self.scales.square() + variance_px2 * (d / focal).square())
        return Gaussians(self.means, scales, self.quats, self.opacities, self.colors)

    def select_for_export(self, prune_ratio: float = 0.0, min_opacity: float = 0.0) -> Gaussians:
        """The Gaussians an export keeps: opacity >= ``min_opacity``, then Lyra's pruning of the least opaque
        ``prune_ratio`` of them (:meth:`prune_by_opacity`; original order kept). Both 0: all, unchanged."""
        for name, value in (("prune_ratio", prune_ratio), ("min_opacity", min_opacity)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise LyraInputError(f"{name}: expected a number in [0, 1), got {value!r}")
        keep = torch.ones(self.num, dtype=torch.bool, device=self.device)
        if min_opacity > 0:
            keep &= self.opacities.detach() >= min_opacity
        if prune_ratio > 0:
            idx = torch.nonzero(keep).reshape(-1)
            count = math.floor(idx.numel() * (1.0 - float(prune_ratio)))
            order = torch.sort(self.opacities.detach()[idx], descending=True, stable=True).indices[:count]
            keep = torch.zeros_like(keep)
            keep[idx[order]] = True
        return self if bool(keep.all()) else self.index(keep)

    def to_ply(self, path: str | Path, layout: str = "compact") -> Path:
        """Write a standard binary 3DGS PLY.

        Fields: x y z, f_dc_0..2 = (rgb - 0.5) / SH_C0, opacity = logit(opacity), scale_i = log(scale + 1e-8),
        rot_0..3 = quaternion (w, x, y, z). ``layout`` ``compact`` writes just these, through
        ``gsplat.export_splats``; ``inria`` writes the original 3DGS code's vertex layout (x y z nx ny nz f_dc_0..2
        f_rest_0..44 opacity scale_0..2 rot_0..3, normals and higher-order SH zero), for loaders that expect it.
        """
        if layout not in PLY_LAYOUTS:
            raise LyraInputError(f"PLY layout: expected one of {PLY_LAYOUTS}, got {layout!r}")
        path = Path(path)
        g = self.detach().to("cpu", torch.float64)
        op = g.opacities.clamp(PLY_OPACITY_EPS, 1.0 - PLY_OPACITY_EPS)
        if layout == "inria":
            return _write_inria_ply(path, g, torch.logit(op))
        from gsplat import export_splats  # lazy: gsplat is only needed for export

        export_splats(
            means=g.means.float(),
            scales=torch.log(g.scales + PLY_LOG_SCALE_EPS).float(),
            quats=g.quats.float(),
            opacities=torch.logit(op).float(),
            sh0=((g.colors - 0.5) / SH_C0).float().unsqueeze(1),
            shN=torch.zeros(g.num, 0, 3),
            format="ply",
            save_to=str(path),
        )
        return path

    @classmethod
    def from_ply(cls, path: str | Path, *, device: torch.device | str = "cpu") -> Gaussians:
        """Read a binary little-endian 3DGS PLY (as written by ``to_ply``) back into float32 Gaussians.

        Higher-order SH (``f_rest_*``) are ignored: this container is degree 0, like Lyra.
        """
        data = _read_binary_ply_vertices(Path(path))
        required = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
        required += [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]
        missing = [name for name in required if name not in data]
        if missing:
            raise LyraInputError(f"{path}: PLY vertex element lacks 3DGS properties {missing}")

        def col(*names: str) -> torch.Tensor:
            return torch.from_numpy(np.stack([data[n].astype(np.float64) for n in names], axis=1))

        means = col("x", "y", "z")
        colors = col("f_dc_0", "f_dc_1", "f_dc_2") * SH_C0 + 0.5
        opacities = torch.sigmoid(torch.from_numpy(data["opacity"].astype(np.float64)))
        scales = torch.exp(col("scale_0", "scale_1", "scale_2"))
        quats = col("rot_0", "rot_1", "rot_2", "rot_3")
        return cls(means=means, scales=scales, quats=quats, opacities=opacities, colors=colors).to(
            device, torch.float32
        )


def _write_inria_ply(path: Path, g: Gaussians, opacity_logits: torch.Tensor) -> Path:
    """The original 3DGS ``save_ply`` layout: float32 little-endian, normals and f_rest zero."""
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(INRIA_REST)] + ["opacity"]
    names += [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]
    m = g.num
    columns = torch.cat([
        g.means, torch.zeros(m, 3), (g.colors - 0.5) / SH_C0, torch.zeros(m, INRIA_REST), opacity_logits[:, None],
        torch.log(g.scales + PLY_LOG_SCALE_EPS), g.quats,
    ], dim=1).numpy().astype("<f4")  # fmt: skip
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {m}"]
    header += [f"property float {n}" for n in names] + ["end_header"]
    with open(path, "wb") as fh:
        fh.write(("\n".join(header) + "\n").encode("ascii"))
        fh.write(np.ascontiguousarray(columns).tobytes())
    return path


def _read_binary_ply_vertices(path: Path) -> dict[str, np.ndarray]:
    """Read the scalar properties of the ``vertex`` element of a binary PLY into a name -> array dict."""
    with open(path, "rb") as fh:
        if fh.readline().strip() != b"ply":
            raise LyraInputError(f"{path}: not a PLY file (first line must be 'ply')")
        fmt, elements, current = None, [], None
        while True:
            line = fh.readline()
            if not line:
                raise LyraInputError(f"{path}: PLY header has no 'end_header' line")
            words = line.decode("ascii", errors="replace").split()
            if not words or words[0] in ("comment", "obj_info"):
                continue
            if words[0] == "end_header":
                break
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                current = (words[1], int(words[2]), [])
                elements.append(current)
            elif words[0] == "property":
                if current is None or words[1] == "list":
                    raise LyraInputError(f"{path}: unsupported PLY property line {line!r}")
                if words[1] not in _PLY_TYPES:
                    raise LyraInputError(f"{path}: unknown PLY property type {words[1]!r}")
                current[2].append((words[2], _PLY_TYPES[words[1]]))
        if fmt not in ("binary_little_endian", "binary_big_endian"):
            raise LyraInputError(f"{path}: expected a binary PLY, got format {fmt!r}")
        order = "<" if fmt == "binary_little_endian" else ">"
        for name, count, props in elements:
            dtype = np.dtype([(p, order + t) for p, t in props])
            raw = fh.read(dtype.itemsize * count)
            if len(raw) != dtype.itemsize * count:
                raise LyraInputError(
                    f"{path}: element {name!r} should hold {count} rows of {dtype.itemsize} bytes, "
                    "the file is shorter"
                )
            if name == "vertex":
                arr = np.frombuffer(raw, dtype=dtype, count=count)
                return {p: np.asarray(arr[p]) for p, _ in props}
    raise LyraInputError(f"{path}: PLY has no 'vertex' element")


# An export's backdrop (:func:`backdrop_gaussians`): how many Gaussians make the sphere, each one's standard
# deviation in units of the mean spacing between neighbours, and its opacity. Measured with our rasterizer
# (tests/test_backdrop.py: 45 views from 5 points up to half the radius from the centre, 3 yaws x 3 pitches): 2048
# at 1.5 spacings let at most 0.0012 of the background through (0.9 spacings: 0.08, along the image border, where
# EWA's clamped Jacobian shrinks the Gaussians whose centres lie outside the view).
BACKDROP_COUNT = 2048
BACKDROP_SPREAD = 1.5
BACKDROP_OPACITY = 0.999


def backdrop_gaussians(centre: torch.Tensor, radius: float, colour: torch.Tensor, count: int = BACKDROP_COUNT,
                       spread: float = BACKDROP_SPREAD, opacity: float = BACKDROP_OPACITY) -> Gaussians:
    """An opaque sphere of ``count`` Gaussians of one ``colour`` (3,) in [0, 1], centred on ``centre`` (3,), of
    ``radius``: Fibonacci-lattice centres (even spacing s = radius sqrt(4 pi / count)), isotropic with standard
    deviation ``spread`` s. Added behind a scene's Gaussians, it bakes the background a decoder was trained over
    into the export: every viewer then shows what training composited (the scene over that colour) instead of
    the scene over the viewer's own background (PlayCanvas's grey, a white page)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 16:
        raise LyraInputError(f"backdrop_gaussians: count must be an integer >= 16, got {count!r}")
    if not (math.isfinite(radius) and radius > 0):
        raise LyraInputError(f"backdrop_gaussians: radius must be a positive number, got {radius!r}")
    centre = centre.detach().to(torch.float32).reshape(3)
    colour = colour.detach().to(torch.float32).reshape(3).clamp(0, 1)
    i = torch.arange(count, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * i / count
    r = torch.sqrt((1.0 - z * z).clamp(min=0))
    phi = math.pi * (3.0 - math.sqrt(5.0)) * i
    dirs = torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=-1).float()
    sigma = spread * radius * math.sqrt(4.0 * math.pi / count)
    quats = torch.zeros(count, 4)
    quats[:, 0] = 1.0
    return Gaussians(
        means=centre + radius * dirs, scales=torch.full((count, 3), sigma), quats=quats,
        opacities=torch.full((count,), float(opacity)), colors=colour.expand(count, 3).contiguous(),
    )  # fmt: skip


def backdrop_radius(gaussians: Gaussians, centre: torch.Tensor, margin: float = 2.0, far: float = 500.0) -> float:
    """A backdrop radius around ``centre`` that lies behind every Gaussian (each mean's distance plus three of
    its largest standard deviations, times ``margin``), but inside the renderers' ``far`` plane (0.8 far at
    most). With ``margin`` 2, a camera at the centre sorts the sphere behind the scene out to 60 degrees off its
    axis (the sphere's z-depth there, r cos 60, still exceeds every scene Gaussian's). An empty set gets
    radius 1."""
    if gaussians.num == 0:
        return 1.0
    g = gaussians.detach()
    reach = (g.means - centre.to(g.means)).norm(dim=-1) + 3.0 * g.scales.max(dim=-1).values
    return float(min(margin * float(reach.max()), 0.8 * far))
