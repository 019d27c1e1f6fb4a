"""Lyra's feed-forward 3DGS decoder (spec 4.3-4.8): latents + Plücker rays -> pixel-aligned 3D Gaussians.

Per view, latent tokens (patch 1x2x2) plus Plücker tokens are concatenated view-major into one sequence, run
through a stack of attention (and, on CUDA with ``mamba_ssm``, bidirectional Mamba-2) blocks, and decoded per
view by one ConvTranspose3d into 12 channels per (frame, 8x8 pixel block): one Gaussian each, placed along the
1/8-resolution ray through the block centre.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lyra_ops.cameras import Cameras
from lyra_ops.color_fit import fit_colors
from lyra_ops.depth import fill_from_neighbours
from lyra_ops.errors import LyraConfigError
from lyra_ops.gaussians import Gaussians
from lyra_ops.latents import PixelPatchifyEncoder
from lyra_ops.plucker import pixel_rays

logger = logging.getLogger(__name__)

ATTENTION = "attention"
MAMBA2 = "mamba2"
BLOCK_TYPES = (ATTENTION, MAMBA2)
HEAD_CHANNELS = 12  # [distance (1), rgb (3), scale (3), quat (4), opacity (1)]
HEAD_SPLIT = (1, 3, 3, 4, 1)
HEAD_PARTS = ("distance", "rgb", "scale", "quat", "opacity")  # the head's channel groups, in HEAD_SPLIT order
# What the input head does at pixels whose depth is not known (depth edges the reliability filter left out): its
# learned output, or the RGB-D unprojection of the filled depth (``input_depth_fill``) with the pixel's colour
INPUT_EDGES = ("learned", "rgbd")
# input_guard_sigmas k: a teacher-frame Gaussian kept by the guard (its centre clears the input's surfaces) but whose
# footprint reaches, within k projected standard deviations, a pixel of the input frame it would lie in front of, is
# shrunk until it stops short of that pixel (0: no shrinking). Dropping instead costs: the Gaussians just outside the
# frame whose footprint spills in are the only content beyond the input's field of view (-3 dB on unseen pixels
# along the paths when dropped within 3 sigma). Measured on 6 held-out default scenes (with input_footprint "depth"),
# against the centre-only guard (k = 0) with the "ray" footprint, at the input camera / on seen pixels at held-out
# cameras / on unseen pixels at held-out cameras, mean dB: k = 1 +0.22 / +0.03 / -0.00, k = 1.5 +0.31 / +0.04 /
# -0.02 (the shipped decoder's), k = 2 +0.37 / +0.05 / -0.04 (held-out cameras overall -0.01); a fine-tune with
# k = 2 on during training gave the input-camera gain back (29.04 dB against 29.35 without it).
GUARD_LEVELS = 64  # the depths the guard's clearance is measured at (log-spaced; each rounded down, never up)
# The input head's footprint: its pixel's width per unit distance along the ray (s / fx), or per unit z-depth
# (s / fx x cos of the ray's angle to the optical axis: the pixel's footprint on the fronto-parallel plane, so a zero
# head output is the RGB-D unprojection's input_scale_init pixels everywhere, not 1 / cos more at the corners)
INPUT_FOOTPRINTS = ("ray", "depth")
# Where the input head's zero-point depth comes from at pixels the known depth leaves out (depth edges the
# reliability filter dropped): the surface behind them (``fill``: the known depth filled from its neighbours,
# ``input_depth_fill`` pixels), or the input frame's own depth there (``input``: the depth stage's, given to
# :meth:`LatentGaussianDecoder.forward` as ``input_depth``; filled as before where not given). The tokens still see
# those pixels as unknown. Measured on 6 held-out default scenes with the shipped weights (issue 27): seen pixels at
# held-out cameras +0.09 to +0.48 dB per scene over ``fill`` (they are where RGB-D on exact depth beat the decoder).
INPUT_EDGE_DEPTHS = ("fill", "input")
# ``input_fit_iters`` / ``input_fit_ridge``: the input head's colours solved against the input image at inference
# (:meth:`LatentGaussianDecoder.fit_input`); the shipped ridge 1 was chosen on a validation store (seed 4242), where
# held-out cameras scored 21.51 / 21.57 / 21.58 / 21.54 dB at ridge 0.1 / 0.3 / 1 / 3 (21.39 without the fit).
# Rendering-only decoder fields: they change which Gaussians a decoding keeps, how far teacher-frame Gaussians reach
# over what the input saw or how the input head treats its pixels, not the weights, so a checkpoint can be decoded
# with other values (:func:`with_render`)
RENDER_FIELDS = ("prune_ratio", "time_frames", "input_guard", "input_guard_sigmas", "input_edges", "input_footprint",
                 "input_edge_depth", "input_fit_iters", "input_fit_ridge")
GAUSSIAN_FRAMES = ("all", "keyframes")  # Gaussians for every frame (Lyra) or for one frame per latent frame
DISTANCE_PARAMS = ("linear", "log")  # distance linear in sigmoid between near and far (Lyra), or log-linear
BACKGROUNDS = ("white", "input_mean")  # composited behind the Gaussians: Lyra's white, or the input's mean colour
FUSES = ("stack", "known")  # every output frame's Gaussians (Lyra), or later frames' only where the input did not see
SCALE_PARAMS = ("absolute", "footprint")
# Frames a time-conditioned decoding (forward_at) emits Gaussians for: the query frame only, or the query frame
# first and then the other output frames (:func:`output_frames`) of every view, fused as usual (kept where the
# input frame of their own time saw nothing), so what other times saw (disocclusions the query time's frames
# miss) is drawn too, with Gaussians the time embedding can fade where they no longer hold.
TIME_FRAMES = ("query", "query+keyframes")  # scale in world units capped (Lyra), or relative to the block footprint
COLOR_SKIP_EPS = 0.02  # skip colours are clamped to [eps, 1 - eps] before their logit
PATCH_EMBED_LN_EPS = 1e-5  # the reference's PatchEmbed3D uses nn.LayerNorm's default eps
# Channels of the embedded defaults (PixelPatchifyEncoder latents, encode_plucker's pooled fallback) and of
# the Cosmos CV8x8x8 tokenizer (16 latent channels, 2 x 16 VAE-encoded Plücker channels) used by the paper.
PATCHIFY_LATENT_CHANNELS = PixelPatchifyEncoder.latent_channels
PATCHIFY_PLUCKER_CHANNELS = 8 * 6
COSMOS_LATENT_CHANNELS = 16
COSMOS_PLUCKER_CHANNELS = 32


@dataclass(frozen=True)
class InputFrame:
    """The input frame itself as given at inference (each None when not): its image (3,H,W) in [0,1] and its
    z-depth (H,W) at every pixel, read by the render settings ``input_fit_iters`` and ``input_edge_depth``."""

    image: torch.Tensor | None = None
    depth: torch.Tensor | None = None

    def check(self, height: int, width: int) -> None:
        """``LyraConfigError`` unless each given tensor has the decoded frames' size."""
        for name, value, shape in (("input_image", self.image, (3, height, width)),
                                   ("input_depth", self.depth, (height, width))):
            if value is not None and (not isinstance(value, torch.Tensor) or tuple(value.shape) != shape):
                found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise LyraConfigError(f"{name}: expected the input frame's {shape} at the decoded frames' size, "
                                      f"found {found}")


def lyra_block_pattern(depth: int, attention_every: int = 8) -> tuple[str, ...]:
    """Lyra's hybrid pattern: block i (0-based) is attention iff (i + 1) % attention_every == 0, else Mamba-2."""
    return tuple(ATTENTION if (i + 1) % attention_every == 0 else MAMBA2 for i in range(depth))


@dataclass(frozen=True)
class DecoderConfig:
    """Architecture and Gaussian activation constants of :class:`LatentGaussianDecoder`.

    ``block_types`` lists "attention" / "mamba2" per block (``None``: all attention). Mamba-2 blocks need
    ``mamba_ssm`` and CUDA; without them the model builds attention blocks instead and logs a warning.
    ``latent_channels`` / ``plucker_channels`` default to the embedded PixelPatchifyEncoder (1536 / 48); the
    ``paper`` preset uses the Cosmos tokenizer's 16 / 32. Distances along rays lie in [near, far].
    """

    width: int = 192
    depth: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    block_types: tuple[str, ...] | None = None
    patch_size: tuple[int, int, int] = (1, 2, 2)
    latent_channels: int = PATCHIFY_LATENT_CHANNELS
    plucker_channels: int = PATCHIFY_PLUCKER_CHANNELS
    temporal_factor: int = 8
    spatial_factor: int = 8
    near: float = 0.1
    far: float = 500.0
    distance_shift: float = -1.65
    scale_cap: float = 0.3
    opacity_shift: float = -2.0
    prune_ratio: float = 0.0
    gaussian_stride: int = 8
    gaussian_frames: str = "all"
    distance_param: str = "linear"
    distance_init: float = 3.0
    scale_param: str = "absolute"
    scale_init: float = 0.6
    color_skip: bool = False
    head_gain: float = 1.0
    background: str = "white"
    depth_input: bool = False
    fuse: str = "stack"
    fuse_covered: float = 1.0
    input_stride: int = 0
    input_scale_init: float = 0.2
    input_opacity_init: float = 0.95
    input_depth_fill: int = 0
    input_gate: tuple[str, ...] = ()
    input_edges: str = "learned"
    input_guard: float = 0.0
    input_guard_sigmas: float = 0.0
    input_footprint: str = "ray"
    input_edge_depth: str = "fill"
    input_fit_iters: int = 0
    input_fit_ridge: float = 1.0
    time_embedding: bool = False
    time_frames: str = "query"
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    gradient_checkpointing: bool = False
    mamba_d_state: int = 256
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_headdim: int = 64
    mamba_chunk_size: int = 256

    def __post_init__(self) -> None:
        def bad(key: str, expected: str) -> LyraConfigError:
            return LyraConfigError(f"decoder.{key}: expected {expected}, got {getattr(self, key)!r}")

        for key in ("width", "depth", "heads", "latent_channels", "plucker_channels", "spatial_factor"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, "a positive int")
        if self.width % self.heads:
            raise LyraConfigError(
                f"decoder.width must be divisible by decoder.heads, got width={self.width}, heads={self.heads}"
            )
        tf = self.temporal_factor
        if isinstance(tf, bool) or not isinstance(tf, int) or tf < 2 or tf % 2:
            raise bad("temporal_factor", "an even int >= 2 (the head pads tf/2 frames on each side)")
        patch = tuple(self.patch_size)
        if len(patch) != 3 or patch[0] != 1 or not all(isinstance(p, int) and p >= 1 for p in patch):
            raise bad("patch_size", "(1, ph, pw) with positive ints (the head needs a temporal patch of 1)")
        object.__setattr__(self, "patch_size", patch)
        types = (ATTENTION,) * self.depth if self.block_types is None else tuple(self.block_types)
        if len(types) != self.depth or any(t not in BLOCK_TYPES for t in types):
            raise LyraConfigError(
                f"decoder.block_types: expected {self.depth} entries (one per block, decoder.depth) from "
                f"{BLOCK_TYPES}, got {self.block_types!r}"
            )
        object.__setattr__(self, "block_types", types)
        if not self.mlp_ratio > 0:
            raise bad("mlp_ratio", "a positive number")
        if not (math.isfinite(self.near) and math.isfinite(self.far) and 0 < self.near < self.far):
            raise LyraConfigError(f"decoder.near/far: expected 0 < near < far, got {self.near}, {self.far}")
        if not 0 < self.scale_cap:
            raise bad("scale_cap", "a positive number")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise bad("prune_ratio", "a fraction in [0, 1)")
        gs = self.gaussian_stride
        if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1 or self.spatial_factor % gs:
            raise bad("gaussian_stride", f"a positive int dividing spatial_factor ({self.spatial_factor})")
        for key, allowed in (("gaussian_frames", GAUSSIAN_FRAMES), ("distance_param", DISTANCE_PARAMS),
                             ("time_frames", TIME_FRAMES),
                             ("scale_param", SCALE_PARAMS), ("background", BACKGROUNDS), ("fuse", FUSES)):
            if getattr(self, key) not in allowed:
                raise bad(key, f"one of {allowed}")
        if self.distance_param == "log" and not self.near < self.distance_init < self.far:
            raise bad("distance_init", f"a distance strictly between near ({self.near}) and far ({self.far})")
        if not (math.isfinite(self.scale_init) and self.scale_init > 0):
            raise bad("scale_init", "a positive number")
        if not (math.isfinite(self.head_gain) and self.head_gain >= 0):
            raise bad("head_gain", "a number >= 0")
        if not isinstance(self.depth_input, bool):
            raise bad("depth_input", "true or false")
        if self.depth_input and self.distance_param != "log":
            raise bad("depth_input", "False unless distance_param is 'log' (the known depth sets the log distance's "
                      "zero point)")
        if not (isinstance(self.fuse_covered, int | float) and 0.0 < self.fuse_covered <= 1.0):
            raise bad("fuse_covered", "a fraction in (0, 1]")
        st = self.input_stride
        if isinstance(st, bool) or not isinstance(st, int) or st < 0 or (st and self.spatial_factor % st):
            raise bad("input_stride", f"0 (off) or a positive int dividing spatial_factor ({self.spatial_factor})")
        if st and self.fuse != "known":
            raise bad("input_stride", "0 unless fuse is 'known' (the input head replaces the input frame's grid)")
        if not (math.isfinite(self.input_scale_init) and self.input_scale_init > 0):
            raise bad("input_scale_init", "a positive number")
        fill = self.input_depth_fill
        if isinstance(fill, bool) or not isinstance(fill, int) or fill < 0:
            raise bad("input_depth_fill", "an int >= 0 (pixels)")
        gate = tuple(self.input_gate)
        if any(part not in HEAD_PARTS for part in gate) or len(set(gate)) != len(gate):
            raise bad("input_gate", f"distinct names from {HEAD_PARTS}")
        if gate and not (self.input_stride and self.depth_input):
            raise bad("input_gate", "() unless input_stride > 0 and depth_input is true (the gate is the input "
                      "frame's known depth)")
        object.__setattr__(self, "input_gate", gate)
        if self.input_edges not in INPUT_EDGES:
            raise bad("input_edges", f"one of {INPUT_EDGES}")
        guard = self.input_guard
        if isinstance(guard, bool) or not isinstance(guard, int | float) or not (math.isfinite(guard) and guard >= 0):
            raise bad("input_guard", "a relative depth tolerance >= 0 (0: off)")
        sig = self.input_guard_sigmas
        if isinstance(sig, bool) or not isinstance(sig, int | float) or not (math.isfinite(sig) and sig >= 0):
            raise bad("input_guard_sigmas", "a number of standard deviations >= 0 (0: no shrinking)")
        if sig and not guard:
            raise bad("input_guard_sigmas", "0 unless input_guard > 0 (it extends the guard to footprints)")
        if self.input_footprint not in INPUT_FOOTPRINTS:
            raise bad("input_footprint", f"one of {INPUT_FOOTPRINTS}")
        if self.input_edge_depth not in INPUT_EDGE_DEPTHS:
            raise bad("input_edge_depth", f"one of {INPUT_EDGE_DEPTHS}")
        iters = self.input_fit_iters
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise bad("input_fit_iters", "an int >= 0 (CGLS iterations of the input-view colour fit; 0: off)")
        ridge = self.input_fit_ridge
        if isinstance(ridge, bool) or not isinstance(ridge, int | float) or not (math.isfinite(ridge) and ridge >= 0):
            raise bad("input_fit_ridge", "a number >= 0 (the colour fit's damping towards the decoded colours)")
        if iters and not self.input_stride:
            raise bad("input_fit_iters", "0 unless input_stride > 0 (the fit solves the input head's colours)")
        if self.input_edge_depth != "fill" and not (self.input_stride and self.depth_input):
            raise bad("input_edge_depth", "'fill' unless input_stride > 0 and depth_input is true (it replaces the "
                      "input frame's known depth at its edges)")
        if (self.input_edges != "learned" or guard) and not (self.input_stride and self.depth_input):
            raise bad("input_edges" if self.input_edges != "learned" else "input_guard",
                      "its default unless input_stride > 0 and depth_input is true (both read the input frame's "
                      "known depth)")
        if not isinstance(self.time_embedding, bool):
            raise bad("time_embedding", "true or false")
        if not 0.0 < self.input_opacity_init < 1.0:
            raise bad("input_opacity_init", "a number in (0, 1)")
        if self.fuse == "known" and not self.depth_input:
            raise bad("fuse", "'stack' unless depth_input is true ('known' drops Gaussians where the known input "
                      "depth covers their block)")
        if self.color_skip and self.latent_channels != PATCHIFY_LATENT_CHANNELS:
            raise bad("color_skip", f"False unless the latents are the {PATCHIFY_LATENT_CHANNELS}-channel patchify "
                      "ones (the skip reads the input pixels back from them)")

    # --- presets and (de)serialisation ------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DecoderConfig:
        """``tiny`` (CPU tests), ``small`` (CPU default) or ``paper`` (Lyra: 16 x 512, 7 Mamba-2 + 1 attention x 2).

        ``overrides`` replace fields, e.g. ``DecoderConfig.preset("paper", latent_channels=1536,
        plucker_channels=48)`` for the paper backbone on the embedded patchify latents.
        """
        if name not in PRESETS:
            near = difflib.get_close_matches(str(name), PRESETS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise LyraConfigError(f"decoder preset: expected one of {sorted(PRESETS)}, got {name!r}{hint}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python fields (tuples as lists), for checkpoint metadata and YAML."""
        out = dataclasses.asdict(self)
        out["block_types"] = list(self.block_types)
        out["patch_size"] = list(self.patch_size)
        out["input_gate"] = list(self.input_gate)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DecoderConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``LyraConfigError`` naming the nearest valid one."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                near = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise LyraConfigError(f"decoder.{key}: unknown key{hint}; valid keys: {names}")
        kwargs = dict(values)
        for key in ("block_types", "patch_size", "input_gate"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


# The CPU presets' Gaussian layout (measured in issue 13's closing note): one Gaussian per 4x4 pixel block of
# each latent frame's last frame (Lyra: per 8x8 block of every frame, whose exact-data ceiling on procedural
# rooms scored below a flat mean colour), placed at a log-parametrised distance that starts at 3 units in
# rooms 1-7 units deep, sized to 0.35 of its block's footprint, coloured as a residual on the block's input
# pixels, and with a head scaled down so that a fresh model already renders its input views. Renders composite
# over the input image's mean colour (Lyra: white), so what no Gaussian covers shows the least-committal colour.
# The depth known before the teacher runs (the input depth warped into each frame) enters as tokens and as the
# zero point of each Gaussian's distance (Lyra's decoder sees only latents: at CPU scale it regressed every
# scene's depth towards the mean, 0.4 AbsRel even at the input view, so the geometry the pipeline already has is
# handed over and the teacher's frames are left to fill what the input never saw). Views are fused, not stacked
# (``fuse: known``): the input frame is drawn once, one Gaussian per pixel from its own head (``input_stride`` 1,
# starting as the input unprojected on its known depth, depth edges filled from behind), and the other frames'
# Gaussians are kept only in 4x4 blocks where no pixel has a known depth, i.e. where the input saw nothing.
# Stacking every frame's Gaussians on the same surfaces cost the exact-data ceiling 3-4 dB against the input
# frame unprojected alone.
CPU_LAYOUT: dict[str, Any] = {
    "near": 0.1, "far": 20.0, "gaussian_stride": 4, "gaussian_frames": "keyframes", "distance_param": "log",
    "distance_init": 3.0, "scale_param": "footprint", "scale_init": 0.35, "color_skip": True, "head_gain": 0.1,
    "opacity_shift": 1.0, "background": "input_mean", "depth_input": True, "fuse": "known", "input_stride": 1,
    "fuse_covered": 0.05, "input_depth_fill": 8,
}  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"width": 64, "depth": 2, "heads": 4, "block_types": (ATTENTION, ATTENTION), **CPU_LAYOUT},
    "small": {"width": 192, "depth": 6, "heads": 6, "block_types": (ATTENTION,) * 6, **CPU_LAYOUT},
    "paper": {
        "width": 512,
        "depth": 16,
        "heads": 8,
        "block_types": lyra_block_pattern(16),
        "latent_channels": COSMOS_LATENT_CHANNELS,
        "plucker_channels": COSMOS_PLUCKER_CHANNELS,
    },
}


# ------------------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------------------


def mamba2_available() -> bool:
    """True when ``mamba_ssm`` imports and CUDA is available (the only setting where Mamba-2 blocks are built)."""
    if not torch.cuda.is_available():
        return False
    try:
        import mamba_ssm  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA extension raising at import
        return False
    return True


def resolve_block_types(config: DecoderConfig) -> tuple[str, ...]:
    """The block types actually built: Mamba-2 entries become attention (with a warning) without mamba_ssm+CUDA."""
    types = tuple(config.block_types)
    count = types.count(MAMBA2)
    if count and not mamba2_available():
        logger.warning(
            "Mamba-2 unavailable (needs the mamba_ssm package and CUDA): falling back to attention blocks for "
            "%d of %d decoder blocks. The model differs from the configured hybrid and its checkpoints are not "
            "interchangeable with Mamba-2 ones.",
            count,
            len(types),
        )
        return (ATTENTION,) * len(types)
    return types


def mamba_kwargs(config: DecoderConfig) -> dict[str, int]:
    """Keyword arguments of ``mamba_ssm.Mamba2`` (spec 4.5: state 256, conv 4, expand 2, head dim 64, chunk 256)."""
    return {
        "d_state": config.mamba_d_state,
        "d_conv": config.mamba_d_conv,
        "expand": config.mamba_expand,
        "headdim": config.mamba_headdim,
        "chunk_size": config.mamba_chunk_size,
    }


class PatchEmbed3D(nn.Module):
    """Conv3d with kernel = stride = patch, then LayerNorm: (V,C,T,h,w) -> tokens (V, T*h/ph*w/pw, width)."""

    def __init__(self, in_channels: int, width: int, patch: tuple[int, int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, width, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(width, eps=PATCH_EMBED_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class ZeroTokenEmbed(nn.Module):
    """Conv3d with kernel = stride = patch and no norm, zero-initialised: (V,C,T,h,w) -> tokens (V, N, width).
    Its tokens start at exactly 0 and grow with training (a LayerNorm after a zero conv would jump to unit
    variance at the first step), so adding it to a trained model starts from that model's output."""

    def __init__(self, in_channels: int, width: int, patch: tuple[int, int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Global multi-head self-attention (qkv bias, no QK-norm) through ``F.scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-LN Transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qkv_bias: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BiMamba2Block(nn.Module):
    """Bidirectional Mamba-2 block (CUDA + ``mamba_ssm`` only): x + Fwd(RMSNorm(x)) + flip(Bwd(flip(RMSNorm(x)))).

    Unlike the reference (one shared input/output projection around two scans), this wraps two complete
    ``mamba_ssm.Mamba2`` mixers, so it holds about twice the projection parameters; outputs are summed as in
    the reference. Not exercised by the CPU test-suite.
    """

    def __init__(self, width: int, eps: float, mamba_kwargs: Mapping[str, Any]) -> None:
        super().__init__()
        from mamba_ssm import Mamba2

        self.norm = nn.RMSNorm(width, eps=eps)
        self.forward_mixer = Mamba2(d_model=width, **mamba_kwargs)
        self.backward_mixer = Mamba2(d_model=width, **mamba_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.forward_mixer(h) + self.backward_mixer(h.flip(1)).flip(1)


# ------------------------------------------------------------------------------------------------------------
# Gaussian parametrisation
# ------------------------------------------------------------------------------------------------------------


def _log_distance_shift(config: DecoderConfig) -> float:
    """Pre-sigmoid shift that puts a zero head output at ``distance_init`` in the log parametrisation."""
    frac = math.log(config.distance_init / config.near) / math.log(config.far / config.near)
    return math.log(frac / (1.0 - frac))


def ray_distance(delta: torch.Tensor, config: DecoderConfig, base: torch.Tensor | None = None) -> torch.Tensor:
    """Distance along the unit ray from the head's distance channel.

    ``linear`` (Lyra): near (1 - w) + far w with w = sigmoid(delta + distance_shift).
    ``log``: near (far / near)^w with w = sigmoid(delta + s), s chosen so that delta = 0 gives ``distance_init``;
    equal steps of delta are equal ratios of distance, so near and far surfaces learn at the same pace. With
    ``base`` (same shape as delta; log only), s is chosen per Gaussian so that delta = 0 gives ``base`` where
    base > 0 (a known distance, ``depth_input``) and ``distance_init`` elsewhere.
    """
    if config.distance_param == "log":
        span = math.log(config.far / config.near)
        shift = torch.full_like(delta, _log_distance_shift(config))
        if base is not None:
            known = base > 0
            frac = (torch.log(base.clamp(min=config.near).to(delta.dtype) / config.near) / span).clamp(1e-4, 1 - 1e-4)
            shift = torch.where(known, torch.logit(frac), shift)
        w = torch.sigmoid(delta + shift)
        return config.near * torch.exp(w * span)
    if base is not None:
        raise LyraConfigError("ray_distance: a known base distance needs distance_param 'log'")
    w = torch.sigmoid(delta + config.distance_shift)
    return config.near * (1.0 - w) + config.far * w


def gaussian_processing(
    raw: torch.Tensor,
    origins: torch.Tensor,
    dirs: torch.Tensor,
    config: DecoderConfig,
    *,
    base_colors: torch.Tensor | None = None,
    footprint: torch.Tensor | None = None,
    base_distance: torch.Tensor | None = None,
    scale_init: float | None = None,
) -> Gaussians:
    """Activate raw head channels (M,12) into Gaussians placed on rays (origins, unit dirs) (M,3) (spec 4.7).

    Channels [delta (1), rgb (3), scale (3), quat (4), opacity (1)]: mean = o + t d with t = :func:`ray_distance`;
    quat normalised (w, x, y, z); opacity = sigmoid(a + opacity_shift).
    Scale: ``absolute`` (Lyra) min(exp(s - (1 - ln cap)), cap); ``footprint`` min(scale_init * f t exp(s), cap)
    with ``footprint`` f (M,1) the block's width per unit distance (gaussian_stride / focal length), so a zero
    head output makes each Gaussian cover ``scale_init`` of its pixel block at any distance.
    Colour: 0.5 tanh(c) + 0.5 (Lyra), or with ``base_colors`` (M,3) in [0,1] (the input pixels of the block,
    ``color_skip``) sigmoid(logit(base) + c), so a zero head output reproduces the input colours.
    ``base_distance`` (M,1): known distances along the rays (0: unknown), see :func:`ray_distance`.
    ``scale_init``: replaces ``config.scale_init`` (the input head's ``input_scale_init``).
    Computed in float32 (at least), whatever the head's precision.
    """
    dtype = torch.promote_types(raw.dtype, torch.float32)
    delta, rgb, scale, quat, alpha = raw.to(dtype).split(HEAD_SPLIT, dim=-1)
    distance = ray_distance(delta, config, base_distance)
    means = origins.to(dtype) + distance * dirs.to(dtype)
    cap = config.scale_cap
    if config.scale_param == "footprint":
        if footprint is None:
            raise LyraConfigError("gaussian_processing: scale_param 'footprint' needs the per-Gaussian footprint")
        init = config.scale_init if scale_init is None else scale_init
        scales = (init * footprint.to(dtype) * distance * torch.exp(scale)).clamp(max=cap)
    else:
        scales = torch.exp(scale - (1.0 - math.log(cap))).clamp(max=cap)
    quats = F.normalize(quat, dim=-1)
    opacities = torch.sigmoid(alpha.squeeze(-1) + config.opacity_shift)
    if base_colors is not None:
        base = base_colors.to(dtype).clamp(COLOR_SKIP_EPS, 1.0 - COLOR_SKIP_EPS)
        colors = torch.sigmoid(torch.logit(base) + rgb)
    else:
        colors = 0.5 * torch.tanh(rgb) + 0.5
    return Gaussians(means=means, scales=scales, quats=quats, opacities=opacities, colors=colors)


def output_frames(config: DecoderConfig, latent_frames: int) -> list[int]:
    """Input-frame indices that get Gaussians: every frame (``all``), or the last frame of each latent frame
    (``keyframes``: 0, 8, 16, ..., the frames a causal 8x temporal encoder aligns its latent frames with)."""
    tf = config.temporal_factor
    if config.gaussian_frames == "keyframes":
        return [tf * k for k in range(latent_frames)]
    return list(range(tf * (latent_frames - 1) + 1))


def query_frames(config: DecoderConfig, latent_frames: int, frame: int) -> list[int]:
    """The frames a decoding at input frame ``frame`` emits Gaussians for (``time_frames``): ``frame`` first."""
    if config.time_frames == "query":
        return [int(frame)]
    return [int(frame)] + [f for f in output_frames(config, latent_frames) if f != frame]


def latent_frame_of(frame: int, temporal_factor: int) -> int:
    """The latent frame holding input frame ``frame`` (causal grouping: frame 0 alone, then 8(k-1)+1 .. 8k)."""
    return (int(frame) + temporal_factor - 1) // temporal_factor


def time_features(times: torch.Tensor) -> torch.Tensor:
    """Lyra's time embedding (spec 4.4): normalised times (...) -> [t, cos t, sin t] (..., 3), float32."""
    t = times.float()
    return torch.stack([t, torch.cos(t), torch.sin(t)], dim=-1)


def latent_time_features(times: torch.Tensor, temporal_factor: int) -> torch.Tensor:
    """Per-frame normalised times (V,T), T = 8 T_l - 7, grouped like the latents (causal slots: latent frame 0
    holds frame 0 in every slot): (V, T_l, 3 x temporal_factor) time features of each latent frame's slots."""
    v = times.shape[0]
    first = times[:, :1].expand(v, temporal_factor - 1)
    slots = torch.cat([first, times], dim=1).reshape(v, -1, temporal_factor)
    return time_features(slots).flatten(2)


def block_colors(latents: torch.Tensor, config: DecoderConfig, frames: Sequence[int] | None = None) -> torch.Tensor:
    """Mean input colour of every Gaussian's pixel block, read back from patchify latents (V,1536,T_l,h,w):
    (V, T_out, 3, H/g, W/g) in [0, 1] for ``frames`` (default: those of :func:`output_frames`) and
    g = ``gaussian_stride``."""
    encoder = PixelPatchifyEncoder()
    frames = output_frames(config, int(latents.shape[2])) if frames is None else list(frames)
    out = []
    for view in latents:
        video = encoder.decode(view.float())[frames]  # (T_out, 3, H, W) in [-1, 1]
        out.append(F.avg_pool2d(video, config.gaussian_stride) * 0.5 + 0.5)
    return torch.stack(out)


def input_colors(latents: torch.Tensor, config: DecoderConfig, frame: int = 0) -> torch.Tensor:
    """Mean colour of each ``input_stride`` block of the input frame (frame ``frame`` of view 0; static: 0), read
    back from patchify latents (V,1536,T_l,h,w): (3, H/s, W/s) in [0, 1]."""
    frame = PixelPatchifyEncoder().decode(latents[0].float())[frame]  # (3, H, W) in [-1, 1]
    return F.avg_pool2d(frame[None], config.input_stride)[0] * 0.5 + 0.5


def encode_known_depth(depth: torch.Tensor, config: DecoderConfig) -> torch.Tensor:
    """Known z-depth of the input frames (V,T,1,H,W), 0 where unknown, as patchify tokens (V,1536,T_l,h,w) for
    the decoder's depth embedding: pseudo-frames [log-depth position in [near, far] mapped to [-1, 1], known
    (+1) / unknown (-1), 0] packed like the RGB latents (:class:`lyra_ops.latents.PixelPatchifyEncoder`)."""
    known = depth > 0
    span = math.log(config.far / config.near)
    pos = (torch.log(depth.clamp(min=config.near) / config.near) / span).clamp(0, 1)
    frames = torch.cat([torch.where(known, pos * 2 - 1, 0.0), known.float() * 2 - 1, torch.zeros_like(depth)], 2)
    encoder = PixelPatchifyEncoder()
    return torch.stack([encoder.encode(view.float()) for view in frames])


def block_distance(depth: torch.Tensor, cameras: Cameras, dirs: torch.Tensor, config: DecoderConfig,
                   edge_ratio: float = 1.1, frames: Sequence[int] | None = None) -> torch.Tensor:
    """Known distance along each Gaussian's ray (T_out,H/g,W/g,1), 0 where unknown, from one view's known
    z-depth (T,1,H,W) (0: unknown) at the output frames: the mean z of the block's central pixels (the 2x2
    around the block centre for even g), divided by the ray's cosine to the optical axis (``dirs``
    (T_out,H/g,W/g,3), unit, from :func:`output_rays`). Unknown where a central pixel is unknown or the central
    pixels straddle a depth edge (max / min > ``edge_ratio``): those Gaussians keep the learned distance."""
    if frames is None:
        frames = output_frames(config, (len(cameras) - 1) // config.temporal_factor + 1)
    frames = list(frames)
    return known_distance(depth[frames, 0], cameras.c2w[frames], dirs, config.gaussian_stride, edge_ratio)


def known_distance(depth: torch.Tensor, c2w: torch.Tensor, dirs: torch.Tensor, stride: int,
                   edge_ratio: float = 1.1) -> torch.Tensor:
    """:func:`block_distance` for frames given directly: z-depth (N,H,W) (0: unknown), their cameras' c2w
    (N,4,4) and unit ray dirs (N,H/stride,W/stride,3) -> (N,H/stride,W/stride,1), 0 where unknown."""
    g = stride
    d = depth.float()
    lo, hi = (g // 2 - 1, g // 2 + 1) if g % 2 == 0 and g > 1 else (g // 2, g // 2 + 1)
    blocks = d.reshape(d.shape[0], d.shape[1] // g, g, d.shape[2] // g, g)[:, :, lo:hi, :, lo:hi]
    blocks = blocks.permute(0, 1, 3, 2, 4).flatten(-2)  # (N,h,w,k)
    low, high = blocks.min(-1).values, blocks.max(-1).values
    ok = (low > 0) & (high <= edge_ratio * low)
    z = torch.where(ok, blocks.mean(-1), 0.0)
    forward = c2w[:, :3, 2].to(dirs)  # (N,3) optical axes
    cos = (dirs * forward[:, None, None, :]).sum(-1).clamp(min=1e-3)
    return (z.to(dirs) / cos)[..., None]


def input_count(config: DecoderConfig, height: int, width: int) -> int:
    """Gaussians of the input head (``input_stride`` s > 0): one per s x s pixel block of the input frame."""
    s = config.input_stride
    return (height // s) * (width // s) if s else 0


def known_blocks(known_depth: torch.Tensor, stride: int) -> torch.Tensor:
    """(..., H/stride, W/stride) bool: the ``stride`` x ``stride`` pixel blocks of a known-depth map (..., H, W)
    (0: unknown, e.g. a depth edge the reliability filter left out) whose every pixel has a known depth."""
    d = known_depth.reshape(-1, 1, *known_depth.shape[-2:])
    unknown = F.max_pool2d((d <= 0).to(torch.float32), stride) if stride > 1 else (d <= 0).to(torch.float32)
    return (unknown == 0).reshape(*known_depth.shape[:-2], *unknown.shape[-2:])


def input_zero_point(config: DecoderConfig) -> torch.Tensor:
    """(HEAD_CHANNELS,) raw input-head channels of the RGB-D unprojection: distance and colour residuals 0 (the
    known distance, the input pixel's colour), scale 0 (``input_scale_init`` of the footprint, isotropic),
    identity rotation, opacity ``input_opacity_init``."""
    zero = torch.zeros(HEAD_CHANNELS)
    zero[7] = 1.0  # quaternion (w, x, y, z) = identity
    p = config.input_opacity_init
    zero[-1] = math.log(p / (1.0 - p)) - config.opacity_shift
    return zero


def gate_known(raw: torch.Tensor, known: torch.Tensor, config: DecoderConfig,
               parts: Sequence[str] | None = None) -> torch.Tensor:
    """The input head's raw channels (M, HEAD_CHANNELS) with the groups ``parts`` (names of :data:`HEAD_PARTS`;
    default ``config.input_gate``) replaced by :func:`input_zero_point` where ``known`` (M,) bool: there the
    Gaussian keeps what the RGB-D unprojection of the input gives (what the input shows exactly is not
    re-learned)."""
    parts = config.input_gate if parts is None else tuple(parts)
    gated = torch.zeros(HEAD_CHANNELS, dtype=torch.bool)
    start = 0
    for name, width in zip(HEAD_PARTS, HEAD_SPLIT, strict=True):
        gated[start : start + width] = name in parts
        start += width
    gated = gated.to(raw.device)
    zero = input_zero_point(config).to(raw)
    mask = known.reshape(-1, 1).to(raw.device) & gated
    return torch.where(mask, zero, raw)


def _project(means: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Pixel coordinates u, v and z-depth (N,) float64 of ``means`` (N,3) in a camera (pixel ``K``, OpenCV ``c2w``)."""
    c2w = c2w.to(torch.float64)
    local = (means.detach().to(torch.float64) - c2w[:3, 3]) @ c2w[:3, :3]  # world -> camera (rotation orthonormal)
    z = local[:, 2]
    zc = z.clamp(min=1e-9)
    k = K.to(torch.float64)
    return k[0, 0] * local[:, 0] / zc + k[0, 2], k[1, 1] * local[:, 1] / zc + k[1, 2], z


def _covers_own_pixel(u: torch.Tensor, v: torch.Tensor, z: torch.Tensor, depth: torch.Tensor,
                      tol: float) -> torch.Tensor:
    """(N,) bool: points (pixel u, v, z-depth z, float64) whose own pixel (u, v floored) lies in the frame with a
    known depth (``depth`` (H,W) float64, 0: unknown) that the point is nearer than (1 + ``tol``) x."""
    h, w = depth.shape
    iu, iv = u.clamp(-1e9, 1e9).floor().long(), v.clamp(-1e9, 1e9).floor().long()
    inside = (z > 0) & (iu >= 0) & (iu < w) & (iv >= 0) & (iv < h)
    own = depth[iv.clamp(0, h - 1), iu.clamp(0, w - 1)]
    return inside & (own > 0) & (z < (1.0 + tol) * own)


def input_view_clearance(means: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor, depth: torch.Tensor, tol: float, *,
                         reach: torch.Tensor | None = None, levels: int = GUARD_LEVELS) -> torch.Tensor:
    """(N,) float64: how far, in pixels, each point ``means`` (N,3) is from covering what a camera saw: the distance
    from the pixel holding its projection (u, v floored) to the nearest pixel of the frame where the point lies
    nearer than (1 + ``tol``) x the camera's z-depth ``depth`` (H,W) (0: unknown, never counts). 0 where its own
    pixel is one (exactly as :func:`input_view_guard` drops); ``inf`` behind the camera or where there is none.

    Elsewhere a lower bound: the depth a point is compared with, z / (1 + tol), is rounded down to one of ``levels``
    log-spaced depths spanning ``depth``'s known values (so the tolerance is at most one level step stricter), and
    the distance is exact (Euclidean, scipy's distance transform) on the frame padded by ``reach`` (N,) (pixels that
    matter: the largest finite value, at most 512), beyond which a point's distance to the frame box is used."""
    from scipy.ndimage import distance_transform_edt

    h, w = depth.shape[-2:]
    with torch.no_grad():
        u, v, z = _project(means, K, c2w)
        d = depth.detach().to(torch.float64).reshape(h, w)
        out = torch.full_like(z, math.inf)
        front = z > 0
        if not bool(front.any()) or not bool((d > 0).any()):
            return out
        du = torch.maximum(-u, u - w).clamp(min=0)
        dv = torch.maximum(-v, v - h).clamp(min=0)
        out[front] = torch.sqrt(du * du + dv * dv)[front]  # lower bound: the distance to the frame box
        iu, iv = u.clamp(-1e9, 1e9).floor().long(), v.clamp(-1e9, 1e9).floor().long()
        hit = _covers_own_pixel(u, v, z, d, tol)
        known = d[d > 0]
        grid = torch.exp(torch.linspace(math.log(float(known.min())), math.log(float(known.max())), max(int(levels), 2),
                                        dtype=torch.float64))
        level = torch.searchsorted(grid, z / (1.0 + tol), right=True) - 1  # rounded down; -1: below every depth
        pad = 0
        if reach is not None:  # pad as far as a point outside the frame reaches into it
            r = reach.detach().to(torch.float64)
            near = front & torch.isfinite(r) & (out < r)
            pad = int(min(math.ceil(float(r[near].max())), 512)) if bool(near.any()) else 0
        pu, pv = iu + pad, iv + pad
        padded = front & ~hit & (pu >= 0) & (pu < w + 2 * pad) & (pv >= 0) & (pv < h + 2 * pad)
        cover = torch.zeros(h + 2 * pad, w + 2 * pad, dtype=torch.bool)
        for lv in torch.unique(level[padded]).tolist():
            cover.zero_()
            cover[pad : pad + h, pad : pad + w] = d > (grid[lv] if lv >= 0 else 0.0)
            sel = padded & (level == lv)
            if not bool(cover.any()):  # behind every surface the camera saw
                out[sel] = math.inf
                continue
            dist = torch.from_numpy(distance_transform_edt((~cover).numpy()))
            out[sel] = dist[pv[sel], pu[sel]]
        out[hit] = 0.0
        # the rounding may mark a point's own pixel although it clears it exactly: half a pixel, not 0
        out[front & ~hit & (out == 0)] = 0.5
    return out


def input_view_guard(means: torch.Tensor, scales: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor,
                     depth: torch.Tensor, tol: float, sigmas: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """What the guard does to Gaussians (``means`` (N,3), ``scales`` (N,3)) against what a camera saw: (keep (N,)
    bool, shrink (N,) float in (0, 1], the factor for their scales).

    Dropped: a Gaussian whose centre projects into the frame nearer than (1 + ``tol``) x the camera's z-depth
    ``depth`` (H,W) (0: unknown, never drops) at its pixel. With ``sigmas`` k > 0 a kept one whose footprint, k
    times its projected standard deviation (largest scale x fx / z), reaches such a pixel for its own depth
    (:func:`input_view_clearance`) is shrunk until it stops there: shrink = clearance / (k sigma). The camera: pixel
    ``K`` (3,3), OpenCV ``c2w`` (4,4).

    Used on the teacher-frame Gaussians of ``fuse: known`` against the input frame (``input_guard``,
    ``input_guard_sigmas``): measured, those in front of or on the input's surfaces, and those whose footprint spills
    over them (just outside the border, or beside an object's silhouette), cost the input view 0.3-0.9 dB; what
    the input saw is drawn by its own head's Gaussians."""
    n = means.shape[0]
    with torch.no_grad():
        u, v, z = _project(means, K, c2w)
        keep = ~_covers_own_pixel(u, v, z, depth.detach().to(torch.float64).reshape(depth.shape[-2:]), tol)
        shrink = torch.ones(n, dtype=torch.float64)
        if sigmas:  # the distance transforms only when a footprint can be shrunk
            spread = sigmas * scales.detach().to(torch.float64).amax(dim=-1) * float(K[0, 0]) / z.clamp(min=1e-9)
            clear = input_view_clearance(means, K, c2w, depth, tol, reach=spread)
            shrink = torch.where(keep & (spread > clear), clear / spread.clamp(min=1e-12), shrink)
    return keep.to(means.device), shrink.to(device=means.device, dtype=scales.dtype)


def fused_keep(config: DecoderConfig, known_depth: torch.Tensor, frames: Sequence[int] | None = None) -> torch.Tensor:
    """Which Gaussians of the decoder's whole output (``forward(prune=False)``) ``fuse: known`` keeps, in its
    order: (input_count + V*T_out*h*w,) bool. ``frames``: the output frames (default :func:`output_frames`; a
    time-conditioned decoding: :func:`query_frames`, the query frame first, whose view-0 frame is the input frame).

    ``known_depth`` (V,T,1,H,W): the input frames' known z-depth (0: unknown), as given to the decoder. The first
    output frame of the first view (the input frame) keeps every Gaussian (with ``input_stride``, the input
    head's Gaussians replace that frame's grid, which is dropped); every other output frame keeps a Gaussian only
    where less than ``fuse_covered`` of its g x g pixel block has a known depth, i.e. where the input frame did
    not see the surface. A surface the input saw is then drawn once, by the input frame's Gaussians, instead of
    by coincident, slightly misregistered Gaussians of every frame that sees it (Lyra's stacking); the teacher's
    frames add Gaussians where they see what the input did not.
    """
    g = config.gaussian_stride
    v, t, _, h, w = known_depth.shape
    if frames is None:
        frames = output_frames(config, (t - 1) // config.temporal_factor + 1)
    frames = list(frames)
    known = (known_depth[:, frames, 0] > 0).float()  # (V,T_out,H,W)
    covered = F.avg_pool2d(known.flatten(0, 1), g).reshape(v, len(frames), h // g, w // g)
    keep = covered < config.fuse_covered - 1e-6
    keep[0, 0] = config.input_stride == 0
    head = torch.ones(input_count(config, h, w), dtype=torch.bool, device=keep.device)
    return torch.cat([head, keep.reshape(-1)])


def nothing_known(cameras_per_view: Sequence[Cameras]) -> torch.Tensor:
    """Known depth (V,T,1,H,W) of views of which nothing is known: all 0."""
    cams = cameras_per_view[0]
    return torch.zeros(len(cameras_per_view), len(cams), 1, cams.height, cams.width)


def input_rays(config: DecoderConfig, cams: Cameras, frame: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The input head's rays: origins, unit dirs (1,H/s,W/s,3) through the s x s pixel blocks of the input frame
    (camera ``frame`` of ``cams``; static: the first, s = ``input_stride``), and the footprint per unit distance
    s / fx (``input_footprint: depth``: times the ray's cosine to the optical axis), float32."""
    first = cams[torch.tensor([int(frame)])]
    origins, dirs = pixel_rays(first, downsample=config.input_stride)
    footprint = (config.input_stride / first.K[:, 0, 0].float())[:, None, None, None].expand(*dirs.shape[:3], 1)
    if config.input_footprint == "depth":  # per unit z-depth: the pixel's footprint on its fronto-parallel plane
        cos = (dirs.float() * first.c2w[:, None, None, :3, 2].float()).sum(-1, keepdim=True)
        footprint = footprint * cos.clamp(min=1e-3)
    return origins.float(), dirs.float(), footprint.float()


def output_rays(
    config: DecoderConfig, cams: Cameras, frames: Sequence[int] | None = None
) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """One view's Gaussian rays: the output frames (``frames``, default :func:`output_frames`) of its
    T = 8 T_l - 7 input cameras, their origins and unit dirs (T_out,h,w,3) at 1/``gaussian_stride`` resolution,
    and each block's footprint per unit distance, stride / fx (T_out,h,w,1), float32."""
    idx = output_frames(config, (len(cams) - 1) // config.temporal_factor + 1) if frames is None else list(frames)
    sel = cams[torch.tensor(idx)]
    origins, dirs = pixel_rays(sel, downsample=config.gaussian_stride)
    footprint = (config.gaussian_stride / sel.K[:, 0, 0].float())[:, None, None, None].expand(*dirs.shape[:3], 1)
    return idx, origins, dirs, footprint


def _exact_gaussians(config: DecoderConfig, origins: torch.Tensor, dirs: torch.Tensor, footprint: torch.Tensor,
                     z: torch.Tensor, forward: torch.Tensor, colors: torch.Tensor, scale_init: float,
                     opacity: float) -> Gaussians:
    """Ceiling Gaussians on rays (...,3) at exact z-depth ``z`` (...) along optical axes ``forward`` (...,3)."""
    distance = (z / (dirs * forward).sum(-1).clamp(min=1e-6)).reshape(-1, 1)
    if config.scale_param == "footprint":
        size = scale_init * footprint.reshape(-1, 1) * distance
    else:
        size = torch.full_like(distance, math.exp(-1.0 + math.log(config.scale_cap)))
    m = distance.shape[0]
    quats = torch.zeros(m, 4)
    quats[:, 0] = 1.0
    return Gaussians(
        means=origins.reshape(-1, 3) + distance * dirs.reshape(-1, 3),
        scales=size.expand(m, 3).clamp(max=config.scale_cap).contiguous(),
        quats=quats, opacities=torch.full((m,), float(opacity)), colors=colors.clamp(0, 1).contiguous(),
    )  # fmt: skip


def ceiling_gaussians(
    config: DecoderConfig,
    cameras_per_view: Sequence[Cameras],
    frames_per_view: Sequence[torch.Tensor],
    depth_per_view: Sequence[torch.Tensor],
    *,
    opacity: float = 0.99,
    known_depth_per_view: Sequence[torch.Tensor] | None = None,
    whole: bool = False,
    frame: int | None = None,
) -> Gaussians:
    """The best this decoder's output layout can do with exact data (the "ceiling" baseline).

    As many Gaussians as the decoder emits, on its own rays (the frames of :func:`output_frames`, one per
    ``gaussian_stride`` block; with ``input_stride``, first the input frame's at that stride): placed at the exact
    depth of the block's centre pixel, coloured with the block's mean teacher colour, isotropic at the head's
    initial scale (``footprint``: ``scale_init`` / ``input_scale_init`` of the block; ``absolute``: the
    zero-output scale), opacity ``opacity``. ``frames_per_view`` (T,3,H,W) in [0,1], ``depth_per_view``
    (T,1,H,W) exact z-depth, both over the whole trajectory of each view. With ``fuse: known``, the Gaussians
    the decoder drops (:func:`fused_keep` of ``known_depth_per_view``, each (T,1,H,W), the decoder's known-depth
    input; None: nothing known) are dropped here too, unless ``whole`` (then: the decoder's whole output,
    ``forward(prune=False)``, in its order). ``frame``: the layout of a time-conditioned decoding at that input
    frame (:meth:`LatentGaussianDecoder.forward_at`: view 0's frame ``frame`` as the input frame, the frames of
    :func:`query_frames`).
    """
    gs = config.gaussian_stride
    t_l = (len(cameras_per_view[0]) - 1) // config.temporal_factor + 1
    frames = output_frames(config, t_l) if frame is None else query_frames(config, t_l, frame)
    first = 0 if frame is None else frame
    parts = []
    if config.input_stride:
        s = config.input_stride
        cams = cameras_per_view[0]
        origins, dirs, footprint = input_rays(config, cams, first)
        z = depth_per_view[0][first : first + 1, 0, s // 2 :: s, s // 2 :: s].float()
        colors = F.avg_pool2d(frames_per_view[0][first : first + 1].float(), s).permute(0, 2, 3, 1).reshape(-1, 3)
        forward = cams.c2w[first : first + 1][:, None, None, :3, 2].float()
        parts.append(_exact_gaussians(config, origins, dirs, footprint, z, forward, colors, config.input_scale_init,
                                      opacity))
    for cams, rgb, depth in zip(cameras_per_view, frames_per_view, depth_per_view, strict=True):
        idx, origins, dirs, footprint = output_rays(config, cams, frames)  # (T,h,w,3), (T,h,w,1)
        z = depth[idx][:, 0, gs // 2 :: gs, gs // 2 :: gs].float()  # (T,h,w)
        forward = cams.c2w[idx][:, None, None, :3, 2].float()
        colors = F.avg_pool2d(rgb[idx].float(), gs).permute(0, 2, 3, 1).reshape(-1, 3)
        parts.append(_exact_gaussians(config, origins, dirs, footprint, z, forward, colors, config.scale_init,
                                      opacity))
    out = Gaussians.cat(parts)
    if config.fuse == "known" and not whole:
        known = (nothing_known(cameras_per_view) if known_depth_per_view is None
                 else torch.stack(list(known_depth_per_view)))
        out = out.index(fused_keep(config, known, frames))
    return out


def prune_gaussians(gaussians: Gaussians, prune_ratio: float) -> Gaussians:
    """Lyra's pruning (spec 4.8): keep the floor(M (1 - prune_ratio)) most opaque Gaussians."""
    if not 0.0 <= float(prune_ratio) < 1.0:
        raise LyraConfigError(f"prune_ratio: expected a fraction in [0, 1), got {prune_ratio!r}")
    if prune_ratio == 0.0:
        return gaussians
    return gaussians.prune_by_opacity(1.0 - float(prune_ratio))


# ------------------------------------------------------------------------------------------------------------
# The decoder
# ------------------------------------------------------------------------------------------------------------


class LatentGaussianDecoder(nn.Module):
    """Latents (V,C,T_l,h,w) + Plücker latents (V,Cp,T_l,h,w) + per-view cameras -> fused Gaussians.

    Construction is deterministic in ``seed`` and leaves the global RNG untouched. Initialisation (spec 4.5):
    Linear trunc-normal std 0.02 and zero bias; LayerNorm 1 / 0; latent patch-embed conv normal with std
    sqrt(2 / fan_out), zero bias; Plücker patch-embed conv zero; head ConvTranspose3d PyTorch's default init.
    """

    def __init__(self, config: DecoderConfig, *, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(config, DecoderConfig):
            raise LyraConfigError(f"config must be a DecoderConfig, got {type(config).__name__}")
        self.config = config
        self.block_types = resolve_block_types(config)
        tf = config.temporal_factor
        _, ph, pw = config.patch_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # any init inside third-party modules (mamba_ssm) draws from this fork
            self.latent_embed = PatchEmbed3D(config.latent_channels, config.width, config.patch_size)
            self.plucker_embed = PatchEmbed3D(config.plucker_channels, config.width, config.patch_size)
            if config.depth_input:  # known input depth as tokens, zero-initialised like the Plücker embedding
                self.depth_embed = ZeroTokenEmbed(PATCHIFY_LATENT_CHANNELS, config.width, config.patch_size)
            if config.time_embedding:  # spec 4.4: input-frame times and the target time, zero-initialised
                self.input_time_embed = nn.Linear(3 * tf, config.width)
                self.target_time_embed = nn.Linear(3, config.width)
            blocks: list[nn.Module] = []
            for kind in self.block_types:
                if kind == ATTENTION:
                    blocks.append(
                        TransformerBlock(config.width, config.heads, config.mlp_ratio, config.qkv_bias, config.norm_eps)
                    )
                else:
                    blocks.append(BiMamba2Block(config.width, config.norm_eps, mamba_kwargs(config)))
            self.blocks = nn.ModuleList(blocks)
            self.norm = nn.LayerNorm(config.width, eps=config.norm_eps)
            r = config.spatial_factor // config.gaussian_stride  # Gaussians per latent cell along each axis
            if config.gaussian_frames == "keyframes":  # one output frame per latent frame
                kernel, stride, padding = (1, ph * r, pw * r), (1, ph * r, pw * r), (0, 0, 0)
            else:  # Lyra: kernel t = stride 8 + 1, padding 8/2 -> 8 T_l - 7 frames
                kernel, stride, padding = (tf + 1, ph * r, pw * r), (tf, ph * r, pw * r), (tf // 2, 0, 0)
            self.head = nn.ConvTranspose3d(
                config.width, HEAD_CHANNELS, kernel_size=kernel, stride=stride, padding=padding
            )
            if config.input_stride:  # the input frame's Gaussians, one per input_stride block, from its tokens
                r_in = config.spatial_factor // config.input_stride
                patch = (1, ph * r_in, pw * r_in)
                self.input_head = nn.ConvTranspose3d(config.width, HEAD_CHANNELS, kernel_size=patch, stride=patch)
        self._init_weights(torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def _init_weights(self, gen: torch.Generator) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, generator=gen)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        conv = self.latent_embed.proj
        fan_out = math.prod(conv.kernel_size) * conv.out_channels
        conv.weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=gen)
        conv.bias.zero_()
        self.plucker_embed.proj.weight.zero_()
        self.plucker_embed.proj.bias.zero_()
        if self.config.depth_input:
            self.depth_embed.proj.weight.zero_()
            self.depth_embed.proj.bias.zero_()
        if self.config.time_embedding:  # zero: a static model loaded into this one decodes as before
            for embed in (self.input_time_embed, self.target_time_embed):
                embed.weight.zero_()
                embed.bias.zero_()
        heads = [self.head, self.input_head] if self.config.input_stride else [self.head]
        for head in heads:
            # PyTorch's default ConvTranspose3d init (kaiming-uniform a = sqrt(5)), drawn from the seeded generator.
            nn.init.kaiming_uniform_(head.weight, a=math.sqrt(5), generator=gen)
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(head.weight)
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(head.bias, -bound, bound, generator=gen)
            if self.config.head_gain != 1.0:  # a fresh model then starts at the parametrisation's zero point
                head.weight.mul_(self.config.head_gain)
                head.bias.mul_(self.config.head_gain)
        if self.config.input_stride:  # the input frame starts near-opaque, as the RGB-D unprojection
            p = self.config.input_opacity_init
            self.input_head.bias[-1] = math.log(p / (1.0 - p)) - self.config.opacity_shift

    # --- input checks --------------------------------------------------------------------------------------
    def check_inputs(
        self, latents: torch.Tensor, plucker: torch.Tensor, cameras_per_view: Sequence[Cameras] | None = None
    ) -> None:
        """Raise ``LyraConfigError`` naming expected vs found shapes when inputs do not fit this decoder."""
        cfg = self.config
        _, ph, pw = cfg.patch_size
        for name, value, channels in (
            ("latents", latents, cfg.latent_channels),
            ("plucker", plucker, cfg.plucker_channels),
        ):
            if not isinstance(value, torch.Tensor) or value.ndim != 5:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise LyraConfigError(f"{name}: expected a tensor (V, C, T_l, h, w), got {shape}")
            if value.shape[1] != channels:
                raise LyraConfigError(
                    f"{name}: expected {channels} channels (decoder.{name.rstrip('s')}_channels), found shape "
                    f"{tuple(value.shape)} with {value.shape[1]} channels: were these made by another encoder than "
                    "the one this decoder was configured for?"
                )
        v, _, t_l, h, w = (int(s) for s in latents.shape)
        if (plucker.shape[0], *plucker.shape[2:]) != (v, t_l, h, w):
            raise LyraConfigError(
                f"plucker: expected (V, Cp, T_l, h, w) = ({v}, {cfg.plucker_channels}, {t_l}, {h}, {w}) to match "
                f"latents {tuple(latents.shape)}, found {tuple(plucker.shape)}"
            )
        if h % ph or w % pw:
            sf = cfg.spatial_factor
            raise LyraConfigError(
                f"latents: the {ph}x{pw} patch needs a latent grid h, w divisible by ({ph}, {pw}) (frames with H, W "
                f"multiples of {sf * ph}, {sf * pw}), found h x w = {h} x {w} (frames {h * sf} x {w * sf})"
            )
        if cameras_per_view is None:
            return
        if len(cameras_per_view) != v:
            raise LyraConfigError(
                f"cameras_per_view: expected {v} Cameras (one per view), found {len(cameras_per_view)}"
            )
        frames = cfg.temporal_factor * (t_l - 1) + 1
        size = (h * cfg.spatial_factor, w * cfg.spatial_factor)
        for i, cams in enumerate(cameras_per_view):
            if not isinstance(cams, Cameras):
                raise LyraConfigError(f"cameras_per_view[{i}]: expected Cameras, found {type(cams).__name__}")
            if len(cams) != frames or (cams.height, cams.width) != size:
                raise LyraConfigError(
                    f"cameras_per_view[{i}]: expected {frames} cameras (T = {cfg.temporal_factor} (T_l - 1) + 1 for "
                    f"T_l = {t_l}) at {size[0]} x {size[1]}, found {len(cams)} cameras at {cams.height} x {cams.width}"
                )

    # --- forward -------------------------------------------------------------------------------------------
    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def forward_raw(self, latents: torch.Tensor, plucker: torch.Tensor,
                    depth_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Raw head output (V, 12, T_out, H/g, W/g): one 12-vector per output frame (:func:`output_frames`) and
        g x g pixel block (g = ``gaussian_stride``; Lyra: every frame, 8 x 8). ``depth_tokens``
        (:func:`encode_known_depth`) are read with ``depth_input`` (None: nothing known)."""
        return self._run(self.head, self.features(latents, plucker, depth_tokens))

    def features(self, latents: torch.Tensor, plucker: torch.Tensor,
                 depth_tokens: torch.Tensor | None = None, times: torch.Tensor | None = None,
                 target_time: float | torch.Tensor | None = None) -> torch.Tensor:
        """The trunk's output tokens as a grid (V, width, T_l, h/ph, w/pw), what the heads read. With
        ``time_embedding``, ``times`` (V,T) (the normalised time of every input frame) and ``target_time`` (the
        time the Gaussians are for) are embedded (spec 4.4) and added to every token (None: not added)."""
        self.check_inputs(latents, plucker)
        dtype = self.latent_embed.proj.weight.dtype
        v, _, t_l, h, w = latents.shape
        _, ph, pw = self.config.patch_size
        tokens = self.latent_embed(latents.to(dtype)) + self.plucker_embed(plucker.to(dtype))  # (V, N, D)
        if self.config.depth_input:
            if depth_tokens is None:  # nothing known
                cfg = self.config
                frames = cfg.temporal_factor * (t_l - 1) + 1
                depth_tokens = encode_known_depth(torch.zeros(v, frames, 1, h * cfg.spatial_factor,
                                                              w * cfg.spatial_factor), cfg)
            if tuple(depth_tokens.shape) != (v, PATCHIFY_LATENT_CHANNELS, t_l, h, w):
                found = tuple(depth_tokens.shape)
                c = PATCHIFY_LATENT_CHANNELS
                raise LyraConfigError(f"depth_tokens: decoder.depth_input needs (V, {c}, T_l, h, w) = ({v}, {c}, "
                                      f"{t_l}, {h}, {w}), found {found}")
            tokens = tokens + self.depth_embed(depth_tokens.to(tokens.device, dtype))
        if self.config.time_embedding and times is not None:
            tokens = tokens + self.time_tokens(times, target_time, (h // ph) * (w // pw)).to(tokens.dtype)
        x = tokens.reshape(1, -1, self.config.width)  # views concatenated view-major, then (t, h, w)
        for block in self.blocks:
            x = self._run(block, x)
        x = self.norm(x)
        return x.reshape(v, t_l, h // ph, w // pw, self.config.width).permute(0, 4, 1, 2, 3)

    def time_tokens(self, times: torch.Tensor, target_time: float | torch.Tensor | None,
                    per_frame: int) -> torch.Tensor:
        """Additive time tokens (V, T_l * h/ph * w/pw, width): each latent frame's input-frame times and the
        target time, embedded as [t, cos t, sin t] (spec 4.4) by two zero-initialised linear maps. (Lyra
        encodes the broadcast time values with its frozen VAE and a patch embedding; on space-constant values
        a patch embedding of patchify latents is this linear map of the per-slot features.) ``times`` (V,T) is
        checked by :meth:`forward_at`, the way in."""
        device = self.input_time_embed.weight.device
        emb = self.input_time_embed(latent_time_features(times.to(device), self.config.temporal_factor))  # (V,T_l,D)
        if target_time is not None:
            target = torch.as_tensor(target_time, dtype=torch.float32, device=device).reshape(())
            emb = emb + self.target_time_embed(time_features(target))
        return emb.repeat_interleave(per_frame, dim=1)

    def rays(
        self, cameras_per_view: Sequence[Cameras], device: torch.device, frames: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The Gaussian rays of all views at 1/``gaussian_stride`` resolution, for the output frames (``frames``,
        default :func:`output_frames`): origins, dirs (V,T_out,h,w,3) and the block footprint per unit distance,
        stride / fx (V,T_out,h,w,1), float32."""
        _, origins, dirs, feet = zip(*(output_rays(self.config, cams, frames) for cams in cameras_per_view),
                                     strict=True)
        return torch.stack(origins).to(device), torch.stack(dirs).to(device), torch.stack(feet).to(device)

    def forward(
        self, latents: torch.Tensor, plucker: torch.Tensor, cameras_per_view: Sequence[Cameras], *,
        known_depth: torch.Tensor | None = None, prune: bool = True, times: torch.Tensor | None = None,
        frame: int | None = None, input_image: torch.Tensor | None = None, input_depth: torch.Tensor | None = None,
    ) -> Gaussians:
        """Gaussians of all V views: with ``input_stride``, first the input head's (the input frame, one per s x s
        block), then the grid (view-major, then t, h, w); reduced by :meth:`fuse` and pruned if
        ``config.prune_ratio`` > 0, unless ``prune=False`` (the whole output, in that order). ``known_depth``
        (V,T,1,H,W), the input frames' z-depth known before the teacher ran (the warped input depth, 0 where
        unknown; None: nothing known), is read with ``depth_input``: as tokens and as the zero point of each
        Gaussian's distance (:func:`block_distance`), as ``color_skip`` does for colour. With ``frame`` (and
        ``times``): :meth:`forward_at` (a wrapper such as DistributedDataParallel only routes ``forward``).

        The input frame itself, when given, is read by two render settings (never in training, where neither is
        passed): ``input_image`` (3,H,W) in [0,1] by ``input_fit_iters`` (the input head's colours solved so the
        render at the input camera reproduces it, :func:`lyra_ops.color_fit.fit_colors`) and ``input_depth``
        (H,W), its z-depth at every pixel (the depth stage's), by ``input_edge_depth`` ``input`` (the head's starting
        depth, so also in the whole output, ``prune=False``); the fit runs after fusing, so not with ``prune=False``."""
        if frame is not None:
            return self.forward_at(latents, plucker, cameras_per_view, times, frame, known_depth=known_depth,
                                   prune=prune, input_image=input_image, input_depth=input_depth)
        return self._decode(latents, plucker, cameras_per_view, known_depth, None, None, prune,
                            InputFrame(input_image, input_depth))

    def forward_at(
        self, latents: torch.Tensor, plucker: torch.Tensor, cameras_per_view: Sequence[Cameras], times: torch.Tensor,
        frame: int, *, known_depth: torch.Tensor | None = None, prune: bool = True,
        input_image: torch.Tensor | None = None, input_depth: torch.Tensor | None = None,
    ) -> Gaussians:
        """Time-conditioned decoding (Lyra's dynamic model, spec 3 and 4.4): the Gaussians of the scene at input
        frame ``frame``, whose normalised time is ``times[0, frame]``.

        View 0 is the input video (its frame ``frame`` is the input frame the input head draws, one Gaussian per
        ``input_stride`` block); every view's frame ``frame`` (all at that time: dynamic paths are time-
        synchronised with the input) gives one Gaussian per ``gaussian_stride`` block, read from the tokens of the
        latent frame holding it, fused as in :meth:`forward` (kept where the input frame did not see). ``times``
        (V,T): every input frame's normalised time, embedded with ``time_embedding`` (without it, or with zero
        time embeddings, this is the static decoder applied at that frame). Same order as :meth:`forward`;
        ``input_image`` / ``input_depth`` as there, of input frame ``frame``."""
        t = len(cameras_per_view[0]) if cameras_per_view else 0
        if isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < t:
            raise LyraConfigError(f"frame: expected an input frame index in [0, {t - 1}], got {frame!r}")
        if not isinstance(times, torch.Tensor) or tuple(times.shape) != (int(latents.shape[0]), t):
            shape = tuple(times.shape) if isinstance(times, torch.Tensor) else type(times).__name__
            raise LyraConfigError(f"times: expected (V, T) = ({int(latents.shape[0])}, {t}) normalised times, "
                                  f"found {shape}")
        return self._decode(latents, plucker, cameras_per_view, known_depth, times, frame, prune,
                            InputFrame(input_image, input_depth))

    def _decode(self, latents: torch.Tensor, plucker: torch.Tensor, cameras_per_view: Sequence[Cameras],
                known_depth: torch.Tensor | None, times: torch.Tensor | None, frame: int | None,
                prune: bool, given: InputFrame) -> Gaussians:
        """:meth:`forward` (``frame`` None: the output frames of :func:`output_frames`, input frame 0) or
        :meth:`forward_at` (the one frame ``frame``, at time ``times[0, frame]``)."""
        cfg = self.config
        self.check_inputs(latents, plucker, cameras_per_view)
        # Without known depth (None), features() encodes "nothing known" and every distance is learned.
        use_depth = cfg.depth_input and known_depth is not None
        if use_depth:
            v, n = int(latents.shape[0]), len(cameras_per_view[0])
            size = (cameras_per_view[0].height, cameras_per_view[0].width)
            if tuple(known_depth.shape) != (v, n, 1, *size):
                raise LyraConfigError(f"known_depth: expected the input frames' depth (V, T, 1, H, W) = ({v}, "
                                      f"{n}, 1, {size[0]}, {size[1]}), found {tuple(known_depth.shape)}")
        given.check(cameras_per_view[0].height, cameras_per_view[0].width)
        t_l = int(latents.shape[2])
        frames = output_frames(cfg, t_l) if frame is None else query_frames(cfg, t_l, frame)
        in_frame = 0 if frame is None else frame
        tokens = encode_known_depth(known_depth, cfg) if use_depth else None
        target_time = None if frame is None or times is None else times[0, frame]
        x = self.features(latents, plucker, tokens, times, target_time)
        if cfg.gaussian_frames == "keyframes":  # one output frame per latent frame: decode the latent frames needed
            raw = self._run(self.head, x[:, :, [latent_frame_of(f, cfg.temporal_factor) for f in frames]])
        else:
            raw = self._run(self.head, x)[:, :, frames]  # (V,12,T_out,h,w)
        origins, dirs, footprint = self.rays(cameras_per_view, raw.device, frames)
        base_distance = None
        if use_depth:
            base_distance = torch.stack([
                block_distance(known_depth[i].to(dirs.device), cams, dirs[i], cfg, frames=frames)
                for i, cams in enumerate(cameras_per_view)
            ]).reshape(-1, 1)  # fmt: skip
        raw = raw.permute(0, 2, 3, 4, 1).reshape(-1, HEAD_CHANNELS)
        base = None
        if cfg.color_skip:
            base = block_colors(latents, cfg, frames).to(raw.device).permute(0, 1, 3, 4, 2).reshape(-1, 3)
        gaussians = gaussian_processing(
            raw, origins.reshape(-1, 3), dirs.reshape(-1, 3), cfg, base_colors=base,
            footprint=footprint.reshape(-1, 1), base_distance=base_distance,
        )  # fmt: skip
        if cfg.input_stride:
            gaussians = Gaussians.cat([self._input_gaussians(x, latents, cameras_per_view[0],
                                                             known_depth if use_depth else None, in_frame, given.depth),
                                       gaussians])
        if not prune:
            return gaussians
        fused = self.fuse(gaussians, known_depth, cameras_per_view, frames, input_depth=given.depth)
        return prune_gaussians(self.fit_input(fused, cameras_per_view[0], in_frame, given.image), cfg.prune_ratio)

    def fit_input(self, gaussians: Gaussians, cams: Cameras, frame: int, image: torch.Tensor | None) -> Gaussians:
        """The fused Gaussians with the input head's colours (the first :func:`input_count`) solved against the
        input frame ``image`` (3,H,W) at its camera (frame ``frame`` of ``cams``), over the decoder's background:
        ``input_fit_iters`` CGLS iterations damped by ``input_fit_ridge`` (:func:`lyra_ops.color_fit.fit_colors`).
        Unchanged without an image or with ``input_fit_iters`` 0."""
        cfg = self.config
        if image is None or not (cfg.input_fit_iters and cfg.input_stride):
            return gaussians
        which = torch.arange(gaussians.num, device=gaussians.means.device) < input_count(cfg, cams.height, cams.width)
        image = image.to(gaussians.means)
        background = torch.ones(3).to(image) if cfg.background == "white" else image.mean(dim=(1, 2))
        return fit_colors(gaussians, which, cams.w2c[frame], cams.K[frame], image, background=background,
                          ridge=float(cfg.input_fit_ridge), iterations=cfg.input_fit_iters)

    def _input_gaussians(self, x: torch.Tensor, latents: torch.Tensor, cams: Cameras,
                         known_depth: torch.Tensor | None, frame: int = 0,
                         input_depth: torch.Tensor | None = None) -> Gaussians:
        """The input head's Gaussians: one per ``input_stride`` block of the input frame (frame ``frame`` of view 0,
        from the tokens of the latent frame holding it; static: frame 0); ``input_depth`` (H,W) its own depth
        (``input_edge_depth``)."""
        cfg = self.config
        k = latent_frame_of(frame, cfg.temporal_factor)
        raw = self._run(self.input_head, x[:1, :, k : k + 1])[0, :, 0].permute(1, 2, 0).reshape(-1, HEAD_CHANNELS)
        origins, dirs, footprint = (t.to(raw.device) for t in input_rays(cfg, cams, frame))
        base_distance = None
        if known_depth is not None:  # unknown pixels (depth edges) start on the surface behind them
            known = known_depth[0, frame : frame + 1, 0].to(dirs.device)
            depth = self.input_frame_depth(known, input_depth)
            base_distance = known_distance(depth, cams.c2w[frame : frame + 1], dirs, cfg.input_stride).reshape(-1, 1)
            exact = known_blocks(known, cfg.input_stride).reshape(-1)
            if cfg.input_gate:
                raw = gate_known(raw, exact, cfg)
            if cfg.input_edges == "rgbd":  # unknown pixels: the filled depth's unprojection, the pixel's colour
                edges = known_blocks(depth, cfg.input_stride).reshape(-1) & ~exact
                raw = gate_known(raw, edges, cfg, HEAD_PARTS)
        base = None
        if cfg.color_skip:
            base = input_colors(latents, cfg, frame).to(raw.device).permute(1, 2, 0).reshape(-1, 3)
        return gaussian_processing(
            raw, origins.reshape(-1, 3), dirs.reshape(-1, 3), cfg, base_colors=base,
            footprint=footprint.reshape(-1, 1), base_distance=base_distance, scale_init=cfg.input_scale_init,
        )  # fmt: skip

    def input_frame_depth(self, known: torch.Tensor, input_depth: torch.Tensor | None) -> torch.Tensor:
        """The input frame's depth (1,H,W) its head starts from and the guard measures against: the known depth
        ``known`` (1,H,W) (0: unknown), with ``input_edge_depth`` ``input`` its unknown pixels taken from
        ``input_depth`` (H,W) where given, the rest filled from behind (``input_depth_fill``)."""
        if self.config.input_edge_depth == "input" and input_depth is not None:
            known = torch.where(known > 0, known, input_depth.to(known).reshape(known.shape).clamp(min=0))
        return fill_from_neighbours(known, self.config.input_depth_fill)

    def fuse(self, gaussians: Gaussians, known_depth: torch.Tensor | None,
             cameras_per_view: Sequence[Cameras], frames: Sequence[int] | None = None, *,
             input_depth: torch.Tensor | None = None) -> Gaussians:
        """The whole output (``forward(prune=False)``) reduced as ``config.fuse`` says: unchanged for ``stack``,
        else the Gaussians of :func:`fused_keep` (None: nothing known, so only the input frame's grid, which the
        input head replaces, is dropped); the guard measures against :meth:`input_frame_depth`."""
        cfg = self.config
        if cfg.fuse != "known":
            return gaussians
        if known_depth is None:
            known_depth = nothing_known(cameras_per_view)
        out = gaussians.index(fused_keep(cfg, known_depth, frames).to(gaussians.device))
        if not (cfg.input_guard and cfg.input_stride):
            return out
        cams = cameras_per_view[0]  # the input frame: view 0's first output frame (a query frame when dynamic)
        first = 0 if frames is None else list(frames)[0]
        head = input_count(cfg, cams.height, cams.width)
        depth = self.input_frame_depth(known_depth[0, first : first + 1, 0].to(out.means.device), input_depth)
        rest = torch.arange(out.num, device=out.means.device) >= head
        clear, shrink = input_view_guard(out.means[rest], out.scales[rest], cams.K[first], cams.c2w[first], depth[0],
                                         cfg.input_guard, cfg.input_guard_sigmas)
        keep = torch.ones(out.num, dtype=torch.bool, device=out.means.device)
        keep[rest] = clear
        factor = torch.ones(out.num, dtype=out.scales.dtype, device=out.means.device)
        factor[rest] = shrink
        return dataclasses.replace(out, scales=out.scales * factor[:, None]).index(keep)


def with_time_frames(model: LatentGaussianDecoder, time_frames: str) -> LatentGaussianDecoder:
    """The same weights (a copy, eval mode) decoding the frames ``time_frames`` names (a rendering-only field)."""
    return with_render(model, time_frames=time_frames)


def with_render(model: LatentGaussianDecoder, **fields: Any) -> LatentGaussianDecoder:
    """The same weights (a copy, eval mode) decoding with other values of :data:`RENDER_FIELDS`; any other field
    raises ``LyraConfigError`` (it would change what the weights mean)."""
    bad = sorted(set(fields) - set(RENDER_FIELDS))
    if bad:
        raise LyraConfigError(f"decoder render settings {bad}: only {list(RENDER_FIELDS)} may differ from the "
                              "checkpoint's config")
    out = LatentGaussianDecoder(dataclasses.replace(model.config, **fields))
    out.load_state_dict(model.state_dict())
    return out.to(next(model.parameters()).device).eval()


def load_decoder_state(model: LatentGaussianDecoder, state_dict: Mapping[str, torch.Tensor], *,
                       keep_missing: Sequence[str] = ()) -> None:
    """Strictly load ``state_dict`` into ``model`` after checking every key and shape.

    Raises ``LyraConfigError`` naming mismatching keys with expected (this model's config) vs found (checkpoint)
    shapes, and missing / unexpected keys, instead of loading a checkpoint of another preset or encoder.
    ``keep_missing``: key prefixes the checkpoint may lack (modules added since, e.g. ``depth_embed.``, whose
    zero initialisation leaves the loaded model's output unchanged); those keep this model's values.
    """
    expected = model.state_dict()
    problems = []
    for key, tensor in expected.items():
        if key in state_dict and tuple(state_dict[key].shape) != tuple(tensor.shape):
            problems.append(
                f"'{key}' expects shape {tuple(tensor.shape)} but the checkpoint has {tuple(state_dict[key].shape)}"
            )
    kept = [k for k in expected if k not in state_dict and any(k.startswith(p) for p in keep_missing)]
    missing = [k for k in expected if k not in state_dict and k not in kept]
    unexpected = [k for k in state_dict if k not in expected]
    if problems or missing or unexpected:
        parts = []
        if problems:
            more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
            parts.append("shape mismatch: " + "; ".join(problems[:5]) + more)
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:5]}")
        raise LyraConfigError(
            f"decoder checkpoint does not match this decoder (width={model.config.width}, "
            f"depth={model.config.depth}, blocks={list(model.block_types)}, "
            f"latent_channels={model.config.latent_channels}, plucker_channels={model.config.plucker_channels}): "
            + " | ".join(parts)
        )
    model.load_state_dict({**{k: expected[k] for k in kept}, **state_dict}, strict=True)
