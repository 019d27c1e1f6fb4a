"""Self-distillation of the 3DGS decoder (spec 5.1-5.4): sampling, batch assembly and one optimisation step.

Pure functions over tensors (no I/O): the training loop, checkpoints and the store live in
``lyra_pipeline/training.py``. One training sample is one scene: ``V`` of its trajectories ("views") are the
decoder's input videos; ``targets`` frame indices are drawn once and rendered for every input view (Lyra's
protocol), and the splatted images are compared with the teacher frames at those cameras.

Differences from the reference, on purpose: stage steps are per stage (not cumulative), the sampling
generator is an explicit ``torch.Generator`` saved in checkpoints (the reference reshuffles on resume), and
the opacity penalty applies no second sigmoid (see ``lyra_ops.losses``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from lyra_ops.cameras import Cameras
from lyra_ops.decoder import (
    BACKGROUNDS,
    DecoderConfig,
    LatentGaussianDecoder,
    input_count,
    output_frames,
    prune_gaussians,
    query_frames,
)
from lyra_ops.errors import LyraConfigError, LyraInputError
from lyra_ops.gaussians import Gaussians
from lyra_ops.latents import LatentEncoder, PixelPatchifyEncoder
from lyra_ops.losses import LossWeights, LPIPSLoss, distillation_loss
from lyra_ops.plucker import encode_plucker, plucker_embedding
from lyra_ops.rasterize import RasterOutput, rasterize_views_chunked

FRAME_SAMPLINGS = ("uniform", "exponential")
EXPONENTIAL_RATE = 3.0  # Lyra's "exponential" target sampling: weight exp(3 p), p the relative frame position
RENDER_NEAR, RENDER_FAR = 0.1, 500.0  # spec 4.9
WHITE = (1.0, 1.0, 1.0)
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class StageSpec:
    """One progressive training stage (spec 5.4), scaled to what the store holds.

    ``steps`` optimiser steps in this stage; ``scale`` integer downsampling of the stored frames (1: store
    resolution; > 1 re-encodes the latents from area-downsampled teacher frames, as Lyra's stages 1-4 re-encode
    RGB); ``input_frames`` frames per input view (None: the whole trajectory, using the stored latents when
    ``scale`` is 1; else 8k+1 frames picked as Lyra does: start, end and a sorted random subset between);
    ``input_views`` trajectories per sample, drawn as ``V ~ U{1..input_views}`` when ``random_views`` (Lyra's
    multi-view stages) else exactly ``input_views``; ``targets`` target frame indices per sample, rendered for
    every input view, drawn without replacement uniformly or with weight ``exp(3 p)`` (``frame_sampling``);
    ``prune_ratio`` / ``opacity_weight``: Lyra's prune stages (0.8 / 0.1). ``input_target``: the input frame
    (frame 0, the input camera of every view) is a target of every sample whose window holds it, besides the
    ``targets`` drawn (Lyra: off; issue 27: what the input saw kept as a target at full weight). ``dynamic``
    (Lyra's stages 8-9, a dynamic store): one query time per sample, the input video plus ``input_views`` whole
    paths as inputs and ``targets`` paths (flipped twins included) as targets at that time
    (:func:`build_dynamic_batch`).
    """

    name: str
    steps: int
    scale: int = 1
    input_frames: int | None = None
    input_views: int = 1
    random_views: bool = False
    targets: int = 4
    frame_sampling: str = "uniform"
    prune_ratio: float = 0.0
    opacity_weight: float = 0.0
    input_target: bool = False
    dynamic: bool = False

    def __post_init__(self) -> None:
        def bad(field: str, expected: str) -> LyraConfigError:
            return LyraConfigError(f"stage {self.name!r}: {field} must be {expected}, got {getattr(self, field)!r}")

        for field in ("steps", "scale", "input_views", "targets"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if field == "steps" else 1):
                raise bad(field, "a positive int" if field != "steps" else "an int >= 0")
        if self.input_frames is not None and (
            isinstance(self.input_frames, bool) or not isinstance(self.input_frames, int)
            or self.input_frames < 1 or (self.input_frames - 1) % 8
        ):
            raise bad("input_frames", "None or 8k+1 (the latent grid's frame count)")
        if self.frame_sampling not in FRAME_SAMPLINGS:
            raise bad("frame_sampling", f"one of {FRAME_SAMPLINGS}")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise bad("prune_ratio", "a fraction in [0, 1)")
        if self.opacity_weight < 0:
            raise bad("opacity_weight", ">= 0")

    @property
    def reencode(self) -> bool:
        """True when the stage cannot use the stored latents (other resolution or a frame subset)."""
        return self.scale != 1 or self.input_frames is not None


INFERENCE = StageSpec("inference", steps=0)  # decoder inference: whole trajectories, stored latents, no targets


@dataclass(frozen=True)
class ViewData:
    """One trajectory of one scene as stored: teacher frames (T,3,H,W) uint8, cameras, stored latents
    (C,T_l,h,w) or None, a depth target (T,1,H,W) with its validity mask (or None), and the depth known before
    the teacher ran (T,1,H,W): the input depth warped into each frame, 0 where unknown (or None)."""

    frames: torch.Tensor
    cameras: Cameras
    latents: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    depth_valid: torch.Tensor | None = None
    known_depth: torch.Tensor | None = None


@dataclass(frozen=True)
class DistillBatch:
    """Decoder inputs and render targets of one sample (V input views, N = V x targets target images)."""

    latents: torch.Tensor  # (V,C,T_l,h,w)
    plucker: torch.Tensor  # (V,Cp,T_l,h,w)
    input_cameras: tuple[Cameras, ...]  # V x (T_in cameras)
    viewmats: torch.Tensor  # (N,4,4) w2c
    Ks: torch.Tensor  # (N,3,3)
    rgb: torch.Tensor  # (N,3,H,W) in [0,1]
    depth: torch.Tensor | None  # (N,1,H,W)
    depth_valid: torch.Tensor | None  # (N,1,H,W) bool
    height: int
    width: int
    input_depth: torch.Tensor | None = None  # (V,T_in,1,H,W) metric z-depth of the input frames (0: unknown)
    background: torch.Tensor | None = None  # (3,) RGB composited behind the Gaussians (None: Lyra's white)
    known_depth: torch.Tensor | None = None  # (V,T_in,1,H,W) warped input depth, the decoder's depth input (0: unknown)
    # Dynamic samples (time-conditioned decoding, LatentGaussianDecoder.forward_at): every input frame's normalised
    # time (V,T_in) and the input frame whose time the Gaussians are for (None: a static sample).
    times: torch.Tensor | None = None
    frame: int | None = None

    def output_frames(self, config: DecoderConfig) -> list[int]:
        """The frames the decoder emits Gaussians for: :func:`output_frames`, or for a dynamic sample the query
        frame's (:func:`query_frames`)."""
        t_l = int(self.latents.shape[2])
        return output_frames(config, t_l) if self.frame is None else query_frames(config, t_l, self.frame)


# ------------------------------------------------------------------------------------------------------------
# Sampling (spec 5.1)
# ------------------------------------------------------------------------------------------------------------


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Uniform int in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def sample_views(gen: torch.Generator, available: Sequence[str], stage: StageSpec) -> list[str]:
    """Input trajectories of one sample: ``V`` distinct names (V ~ U{1..input_views} when ``random_views``)."""
    if not available:
        raise LyraInputError("sample_views: the scene has no trajectory with teacher frames")
    most = min(stage.input_views, len(available))
    count = _randint(gen, 1, most) if stage.random_views else most
    order = torch.randperm(len(available), generator=gen)[:count]
    return [available[int(i)] for i in order]


def sample_input_frames(gen: torch.Generator, num_frames: int, stage: StageSpec) -> tuple[list[int], int, int]:
    """Input frame indices and the [start, end] window targets are drawn from.

    Whole trajectory when ``stage.input_frames`` is None. Otherwise (Lyra): a gap g ~ U{n-1..T-1}, a random
    start, inputs = start, end and a sorted random subset of the frames in between.
    """
    if stage.input_frames is None or stage.input_frames >= num_frames:
        if stage.input_frames is not None and stage.input_frames > num_frames:
            raise LyraInputError(
                f"stage {stage.name!r}: input_frames={stage.input_frames} but the trajectories have {num_frames}"
            )
        return list(range(num_frames)), 0, num_frames - 1
    n = stage.input_frames
    gap = _randint(gen, n - 1, num_frames - 1)
    start = _randint(gen, 0, num_frames - 1 - gap)
    end = start + gap
    middle = torch.randperm(gap - 1, generator=gen)[: n - 2] + start + 1 if n > 2 else torch.empty(0)
    return sorted([start, end, *(int(i) for i in middle)]), start, end


def with_input_target(targets: Sequence[int], start: int) -> list[int]:
    """``targets`` with the input frame (0) added when the window starting at ``start`` holds it."""
    return sorted(set(targets) | {0}) if start == 0 else list(targets)


def sample_targets(gen: torch.Generator, start: int, end: int, count: int, mode: str) -> list[int]:
    """``count`` distinct frame indices in [start, end], uniform or with weight exp(3 p) (p in [0, 1])."""
    if mode not in FRAME_SAMPLINGS:
        raise LyraConfigError(f"frame_sampling must be one of {FRAME_SAMPLINGS}, got {mode!r}")
    span = end - start + 1
    count = min(count, span)
    if mode == "uniform":
        weights = torch.ones(span, dtype=torch.float64)
    else:
        weights = torch.exp(EXPONENTIAL_RATE * torch.linspace(0.0, 1.0, span, dtype=torch.float64))
    picked = torch.multinomial(weights, count, replacement=False, generator=gen)
    return sorted(int(i) + start for i in picked)


# ------------------------------------------------------------------------------------------------------------
# Batch assembly
# ------------------------------------------------------------------------------------------------------------


def downsample_view(view: ViewData, scale: int) -> ViewData:
    """Area-downsample frames by an integer factor (exact box filter), intrinsics scaled to match (pixel
    centres stay at +0.5), depth and its mask by nearest sampling of each block's centre pixel."""
    if scale == 1:
        return view
    _, _, h, w = view.frames.shape
    if h % scale or w % scale:
        raise LyraConfigError(f"scale {scale} does not divide the stored frame size {h}x{w}")
    frames = F.avg_pool2d(view.frames.float(), scale)
    cameras = view.cameras.resized(h // scale, w // scale)
    pick = (slice(None), slice(None), slice(scale // 2, None, scale), slice(scale // 2, None, scale))
    depth = view.depth[pick] if view.depth is not None else None
    valid = view.depth_valid[pick] if view.depth_valid is not None else None
    known = view.known_depth[pick] if view.known_depth is not None else None
    return ViewData(frames=frames, cameras=cameras, latents=None, depth=depth, depth_valid=valid, known_depth=known)


def build_batch(
    views: Sequence[ViewData],
    input_frames: Sequence[int],
    target_frames: Sequence[int],
    stage: StageSpec,
    encoder: LatentEncoder,
    background: str = "white",
) -> DistillBatch:
    """Decoder inputs (latents + Plücker latents) and render targets of one sample; ``background`` one of
    :data:`BACKGROUNDS` (see :func:`background_color`)."""
    if not views:
        raise LyraInputError("build_batch: no input views")
    if background not in BACKGROUNDS:
        raise LyraConfigError(f"build_batch: background must be one of {', '.join(BACKGROUNDS)}, got {background!r}")
    scaled = [downsample_view(v, stage.scale) for v in views]
    height, width = int(scaled[0].frames.shape[2]), int(scaled[0].frames.shape[3])
    idx_in = torch.tensor(list(input_frames), dtype=torch.long)
    idx_t = torch.tensor(list(target_frames), dtype=torch.long)
    latents, pluckers, cams_in = [], [], []
    viewmats, ks, rgbs, depths, valids, in_depths, known = [], [], [], [], [], [], []
    for original, view in zip(views, scaled, strict=True):
        frames01 = view.frames.float() / 255.0  # uint8, or area-averaged 0..255 floats
        cams = view.cameras[idx_in]
        if not stage.reencode and original.latents is not None:
            latents.append(original.latents.float())
        else:
            if not isinstance(encoder, PixelPatchifyEncoder):
                raise LyraConfigError(
                    f"stage {stage.name!r} re-encodes frames (scale {stage.scale}, input_frames {stage.input_frames}) "
                    f"but encoder {getattr(encoder, 'name', encoder)!r} is not available for re-encoding here"
                )
            latents.append(encoder.encode(frames01[idx_in] * 2.0 - 1.0))
        pluckers.append(encode_plucker(plucker_embedding(cams), encoder))
        cams_in.append(cams)
        viewmats.append(view.cameras.w2c[idx_t])
        ks.append(view.cameras.K[idx_t])
        rgbs.append(frames01[idx_t])
        if view.known_depth is not None:
            known.append(view.known_depth[idx_in].float())
        if view.depth is not None:
            valid_all = view.depth_valid if view.depth_valid is not None else view.depth > 0
            in_depths.append(torch.where(valid_all[idx_in], view.depth[idx_in].float(), 0.0))
            depths.append(view.depth[idx_t].float())
            valids.append(view.depth_valid[idx_t] if view.depth_valid is not None else view.depth[idx_t] > 0)
    return DistillBatch(
        latents=torch.stack(latents),
        plucker=torch.stack(pluckers),
        input_cameras=tuple(cams_in),
        viewmats=torch.cat(viewmats).float(),
        Ks=torch.cat(ks).float(),
        rgb=torch.cat(rgbs),
        depth=torch.cat(depths) if len(depths) == len(views) else None,
        depth_valid=torch.cat(valids) if len(valids) == len(views) else None,
        height=height,
        width=width,
        input_depth=torch.stack(in_depths) if len(in_depths) == len(views) else None,
        background=background_color(views[0].frames[0], background),
        known_depth=torch.stack(known) if len(known) == len(views) else None,
    )


def build_dynamic_batch(
    input_view: ViewData,
    views: Sequence[ViewData],
    targets: Sequence[ViewData],
    frame: int,
    times: torch.Tensor,
    encoder: LatentEncoder,
    background: str = "white",
) -> DistillBatch:
    """One dynamic sample (spec 5.1, dynamic): the decoder reads the input video (``input_view``, view 0: its
    frames, cameras and depth; latents encoded here) and the whole time-synchronised ``views``, and is asked for
    the scene at input frame ``frame`` (normalised time ``times[frame]``, ``times`` (T,)); the targets are frame
    ``frame`` of every view in ``targets`` (Lyra: the 12 paths, flipped twins included, all at that time; none:
    an inference batch)."""
    n = int(input_view.frames.shape[0])
    if not 0 <= int(frame) < n or tuple(times.shape) != (n,):
        raise LyraInputError(f"build_dynamic_batch: frame {frame} and times {tuple(times.shape)} do not fit the "
                             f"input video's {n} frames")
    inputs = build_batch([input_view, *views], list(range(n)), [], INFERENCE, encoder, background)
    inputs = replace(inputs, background=background_color(input_view.frames[int(frame)], background),
                     times=times.float()[None].expand(1 + len(views), n).contiguous(), frame=int(frame))
    if not targets:  # inference: the decoder's inputs only
        return inputs
    pick = [int(frame)]
    rgb = torch.cat([t.frames[pick].float() / 255.0 for t in targets])
    depth = valid = None
    if all(t.depth is not None for t in targets):
        depth = torch.cat([t.depth[pick].float() for t in targets])
        valid = torch.cat([(t.depth_valid if t.depth_valid is not None else t.depth > 0)[pick] for t in targets])
    return replace(
        inputs, viewmats=torch.cat([t.cameras.w2c[pick] for t in targets]).float(),
        Ks=torch.cat([t.cameras.K[pick] for t in targets]).float(), rgb=rgb, depth=depth, depth_valid=valid,
    )  # fmt: skip


def background_color(input_frame: torch.Tensor, mode: str) -> torch.Tensor | None:
    """The RGB (3,) float32 in [0, 1] composited behind the Gaussians: ``"white"`` -> None (the renderer's
    white), ``"input_mean"`` -> the mean colour of ``input_frame`` ((3,H,W) uint8, or float in [0, 1]), the
    input image every trajectory starts from. A pixel no Gaussian covers then shows the flat baseline's colour,
    the least-committal guess for what nothing saw, instead of a white that no room contains."""
    if mode not in BACKGROUNDS:
        raise LyraConfigError(f"background must be one of {', '.join(BACKGROUNDS)}, got {mode!r}")
    if mode == "white":
        return None
    frame = input_frame.float() / 255.0 if input_frame.dtype == torch.uint8 else input_frame.float()
    return frame.mean(dim=(1, 2))


def batch_to(batch: DistillBatch, device: torch.device | str) -> DistillBatch:
    """The batch with its tensors on ``device`` (cameras stay on the CPU: the decoder moves its rays)."""
    moved = {k: getattr(batch, k).to(device) for k in ("latents", "plucker", "viewmats", "Ks", "rgb")}
    for k in ("depth", "depth_valid", "input_depth", "background", "known_depth", "times"):
        value = getattr(batch, k)
        moved[k] = value.to(device) if value is not None else None
    return replace(batch, **moved)


# ------------------------------------------------------------------------------------------------------------
# Forward, loss, step
# ------------------------------------------------------------------------------------------------------------


def decode_gaussians(model: LatentGaussianDecoder, batch: DistillBatch, prune_ratio: float = 0.0, *,
                     input_image: torch.Tensor | None = None, input_depth: torch.Tensor | None = None) -> Gaussians:
    """Decoder forward on one batch, then Lyra's opacity pruning; ``input_image`` / ``input_depth``: the input
    frame itself, for the render settings that read it (inference only, see ``LatentGaussianDecoder.forward``)."""
    return prune_gaussians(model(batch.latents, batch.plucker, list(batch.input_cameras),
                                 known_depth=batch.known_depth, times=batch.times, frame=batch.frame,
                                 input_image=input_image, input_depth=input_depth), prune_ratio)


def render_batch(
    gaussians: Gaussians, batch: DistillBatch, *, backend: str = "torch", views_per_chunk: int = 4
) -> RasterOutput:
    """Render the batch's target cameras over its background (Lyra: white) with deferred (chunked) back-prop."""
    bg = batch.background if batch.background is not None else torch.tensor(WHITE)
    background = bg.to(dtype=gaussians.dtype, device=gaussians.device)
    return rasterize_views_chunked(
        gaussians, batch.viewmats.to(gaussians.device), batch.Ks.to(gaussians.device), batch.width, batch.height,
        views_per_chunk=views_per_chunk, background=background, backend=backend, near=RENDER_NEAR, far=RENDER_FAR,
    )  # fmt: skip


def batch_loss(
    model: LatentGaussianDecoder,
    batch: DistillBatch,
    stage: StageSpec,
    *,
    weights: LossWeights,
    lpips: LPIPSLoss | None = None,
    backend: str = "torch",
    views_per_chunk: int = 4,
    forward: Callable[..., Gaussians] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Distillation loss of one batch: (total, parts, number of Gaussians after pruning). ``forward``: what to
    call for the decoder's forward pass (a DistributedDataParallel wrapper of ``model``), default ``model``.
    ``autocast_dtype`` (e.g. bfloat16): the forward runs under autocast; the Gaussians are rendered and the losses
    taken in fp32."""
    with _autocast(batch.latents.device, autocast_dtype):
        unpruned = (forward or model)(batch.latents, batch.plucker, list(batch.input_cameras),
                                      known_depth=batch.known_depth, prune=False, times=batch.times,
                                      frame=batch.frame)
    if autocast_dtype is not None:
        unpruned = unpruned.to(dtype=torch.float32)
    fused = model.fuse(unpruned, batch.known_depth, list(batch.input_cameras), batch.output_frames(model.config))
    gaussians = prune_gaussians(prune_gaussians(fused, model.config.prune_ratio), stage.prune_ratio)
    out = render_batch(gaussians, batch, backend=backend, views_per_chunk=views_per_chunk)
    total, parts = distillation_loss(
        out, batch.rgb.to(out.rgb.device), batch.depth, gaussians.opacities,
        weights=replace(weights, opacity=stage.opacity_weight), lpips=lpips, depth_valid=batch.depth_valid,
    )  # fmt: skip
    if weights.gaussian_depth and batch.input_depth is not None:
        parts["gaussian_depth"] = gaussian_depth_loss(unpruned, batch, model.config)
        total = total + weights.gaussian_depth * parts["gaussian_depth"]
        parts["total"] = total
    parts.update(gaussian_stats(gaussians, batch, out))
    return total, parts, gaussians.num


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def gaussian_depth_loss(gaussians: Gaussians, batch: DistillBatch, config: DecoderConfig) -> torch.Tensor:
    """Mean |log z_pred - log z_target| over the (unpruned, in decoder order) Gaussians whose own pixel block has
    a known input depth: z_pred is the Gaussian's depth in the camera of the frame it was emitted for, z_target
    the input frame's metric depth at the block's centre pixel (``batch.input_depth``). Direct supervision of the
    distance channel, denser and more local than the rendered-depth loss (CPU presets; off in Lyra's setting).
    With ``input_stride``, the input head's Gaussians (first in the order) are scored against frame 0 of view 0
    (a dynamic sample: the query frame of view 0, the input video)."""
    gs = config.gaussian_stride
    idx = torch.tensor(batch.output_frames(config))
    first = 0 if batch.frame is None else batch.frame  # the input frame the input head draws
    n_in = input_count(config, batch.height, batch.width)
    preds, targets = [], []

    def depth_in(cams_c2w: torch.Tensor, means: torch.Tensor) -> torch.Tensor:  # (N,4,4), (N,h,w,3) -> (N,h,w)
        rel = means - cams_c2w[:, None, None, :3, 3]
        return (rel * cams_c2w[:, None, None, :3, 2]).sum(-1)

    if n_in:
        s = config.input_stride
        means = gaussians.means[:n_in].reshape(1, batch.height // s, batch.width // s, 3)
        preds.append(depth_in(batch.input_cameras[0].c2w[first : first + 1].to(means), means).reshape(-1))
        targets.append(batch.input_depth[0][first : first + 1, 0, s // 2 :: s, s // 2 :: s].to(means).reshape(-1))
    means = gaussians.means[n_in:].reshape(len(batch.input_cameras), len(idx), batch.height // gs,
                                           batch.width // gs, 3)
    for v, cams in enumerate(batch.input_cameras):
        preds.append(depth_in(cams.c2w[idx].to(means), means[v]).reshape(-1))
        targets.append(batch.input_depth[v][idx, 0, gs // 2 :: gs, gs // 2 :: gs].to(means).reshape(-1))
    pred, target = torch.cat(preds), torch.cat(targets)
    ok = target > 0
    if not bool(ok.any()):
        return pred[ok].sum()
    return (torch.log(pred[ok].clamp(min=1e-3)) - torch.log(target[ok])).abs().mean()


def gaussian_stats(gaussians: Gaussians, batch: DistillBatch, out: RasterOutput) -> dict[str, torch.Tensor]:
    """What a collapse to fog shows in: mean opacity and the share above 0.5, mean largest scale, mean distance
    of the means from the first input camera, mean rendered alpha (detached scalars)."""
    with torch.no_grad():
        centre = batch.input_cameras[0].c2w[0, :3, 3].to(gaussians.means)
        return {
            "opacity_mean": gaussians.opacities.mean(),
            "opacity_above_half": (gaussians.opacities > 0.5).float().mean(),
            "scale_mean": gaussians.scales.max(dim=-1).values.mean(),
            "distance_mean": (gaussians.means - centre).norm(dim=-1).mean(),
            "alpha_mean": out.alpha.detach().mean(),
        }


def warmup_lambda(warmup_steps: int, schedule: str = "constant", total_steps: int = 0, min_ratio: float = 0.0):
    """Learning-rate factor per step. ``constant``: Lyra's ``constant_with_warmup`` (spec 5.3), linear from 0 to
    1 over ``warmup_steps`` then 1. ``cosine``: the same warm-up, then a half cosine from 1 down to ``min_ratio``
    at ``total_steps`` (held there after)."""
    if schedule not in LR_SCHEDULES:
        raise LyraConfigError(f"learning-rate schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step + 1 < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(total_steps - warmup_steps, 1)
        progress = min(max(step + 1 - warmup_steps, 0) / span, 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def train_step(
    model: LatentGaussianDecoder,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: DistillBatch,
    stage: StageSpec,
    *,
    weights: LossWeights,
    grad_clip: float = 1.0,
    lpips: LPIPSLoss | None = None,
    backend: str = "torch",
    views_per_chunk: int = 4,
) -> dict[str, float]:
    """One AdamW step with gradient clipping. Raises ``FloatingPointError`` (naming the loss part or the
    gradients) BEFORE touching the weights when anything is non-finite, so a NaN never reaches a checkpoint."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total, parts, count = batch_loss(
        model, batch, stage, weights=weights, lpips=lpips, backend=backend, views_per_chunk=views_per_chunk
    )
    total.backward()
    norm, lr = apply_gradients(list(model.parameters()), optimizer, scheduler, grad_clip,
                               f"train_step, stage {stage.name!r}")
    out = {name: float(value.detach()) for name, value in parts.items()}
    out.update(grad_norm=float(norm), lr=float(lr), gaussians=float(count))
    return out


def apply_gradients(params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, grad_clip: float,
                    what: str) -> tuple[float, float]:
    """Clip the accumulated gradients of ``params``, then step the optimizer and the scheduler: (gradient norm,
    learning rate used). A non-finite norm raises ``FloatingPointError`` (naming ``what``) before the weights are
    touched. Sharded (FSDP DTensor) gradients give a sharded norm, gathered here."""
    total = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"{what}: non-finite gradient norm ({norm})")
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    scheduler.step()
    return norm, lr
