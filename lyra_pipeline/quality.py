"""The decoder-quality table: the learned decoder beside baselines that need no learning, on one procedural scene.

For a held-out procedural scene (its seed never trained on) and a decoder, :func:`scene_quality_rows` scores
each method on two splits, one row per (split, frame, method):

* ``path``: every ``path_stride``-th frame of each of the scene's trajectories (frame 0, the input view,
  included, as in the decoder's validation), against the exact render (8-bit quantised like stored frames)
  and against the teacher frame;
* ``held_out``: :func:`lyra_ops.baselines.held_out_cameras` poses no model saw, rendered exactly; scored on
  all pixels and on the pixels some input frame saw (:func:`lyra_ops.baselines.seen_mask`, exact depths).

Methods: ``flat`` (the input frame's mean colour, depth = a plane at its median depth), ``rgbd`` (the input
frame unprojected with its exact depth), ``rgbd_known`` (on request: the same on the known depth the decoder is
given, the depth edges the reliability filter left unknown filled from behind as ``input_edge_depth: fill`` does),
``ceiling``
(``lyra_ops.decoder.ceiling_gaussians``: exact depth and teacher colours on the decoder's own output grid),
``optimized_<N>`` (per-scene 3DGS optimisation on the
teacher frames, snapshots after N steps of one run), ``decoder``. Per row: PSNR, SSIM, LPIPS (with a local
LPIPS module), depth AbsRel of the render vs exact depth where its alpha > 0.5, and the plane's AbsRel.
:func:`summarize_quality` reduces rows to means and spread over scenes. Renders composite over the input frame's
mean colour (``QualitySettings.background``; Lyra's white on request) with the training renderer's near/far
(``lyra_ops.distill.render_batch``).
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from lyra_ops import decoder as decoder_ops
from lyra_ops.baselines import (
    depth_absrel,
    flat_image,
    held_out_cameras,
    median_depth,
    plane_depth,
    rgbd_gaussians,
    seen_mask,
)
from lyra_ops.cameras import Cameras
from lyra_ops.decoder import BACKGROUNDS
from lyra_ops.depth import fill_from_neighbours
from lyra_ops.distill import RENDER_FAR, RENDER_NEAR, WHITE, ViewData, background_color
from lyra_ops.errors import LyraConfigError, LyraInputError
from lyra_ops.gaussians import Gaussians
from lyra_ops.images import from_uint8, to_uint8
from lyra_ops.metrics import psnr
from lyra_ops.optimize import OptimizeConfig, init_gaussians_from_rgbd, optimize_scene
from lyra_ops.rasterize import RasterOutput, rasterize_views_chunked
from lyra_ops.scenes import ProceduralScene
from lyra_ops.seeding import derive_seed
from lyra_pipeline.storage import RunStore
from lyra_pipeline.training import ViewCache, index_dataset, procedural_world, scene_gaussians

log = logging.getLogger(__name__)

PATH, HELD_OUT, INPUT = "path", "held_out", "input"
SPLITS = (PATH, HELD_OUT, INPUT)
CHEAP_METHODS = ("flat", "rgbd", "ceiling", "decoder")
OPTIMIZED_METHODS = ("optimized_300", "optimized_1000")
METHODS = ("flat", "rgbd", "rgbd_known", "ceiling", *OPTIMIZED_METHODS, "decoder")
_OPTIMIZED = re.compile(r"^optimized_([1-9][0-9]*)$")
# Per-row metrics (NaN where they do not apply: teacher scores off the paths, seen / unseen PSNR of a view with
# no such pixel, LPIPS without a local LPIPS module). Summaries leave out a metric that is NaN everywhere.
METRICS = ("psnr", "ssim", "lpips", "psnr_seen", "psnr_unseen", "psnr_teacher", "ssim_teacher", "lpips_teacher",
           "depth_absrel")
TIMINGS = ("build_seconds", "render_seconds")

QUALITY_SCHEMA = pa.schema([
    ("model_sha256", pa.string()), ("scene_id", pa.string()), ("split", pa.string()), ("trajectory", pa.string()),
    ("frame", pa.int32()), ("method", pa.string()),
    ("psnr", pa.float64()), ("ssim", pa.float64()), ("lpips", pa.float64()), ("psnr_seen", pa.float64()),
    ("psnr_unseen", pa.float64()), ("seen_fraction", pa.float64()), ("psnr_teacher", pa.float64()),
    ("ssim_teacher", pa.float64()),
    ("lpips_teacher", pa.float64()), ("depth_absrel", pa.float64()), ("plane_depth_absrel", pa.float64()),
    ("gaussians", pa.int64()), ("build_seconds", pa.float64()), ("render_seconds", pa.float64()),
])  # fmt: skip


@dataclass(frozen=True)
class QualitySettings:
    """How one scene is scored (recorded beside every result; defaults are the CPU settings of the bench).

    ``path_stride``: score every k-th frame of each trajectory. ``held_out_views`` poses per scene, drawn from
    ``derive_seed(seed, "held-out-cameras", scene_id)``, within ``max_angle_deg`` yaw/pitch of the input
    camera, their centres inside the trajectories' box widened by ``held_out_margin`` of its size, kept
    ``room_margin`` world units inside the room's walls and reachable from the input camera in a straight line
    (never inside an object). ``seen_tol``: relative depth agreement of :func:`seen_mask`: a target pixel is
    *seen* when its surface projects into the input frame (the image the scene is built from) within that
    fraction of the input's exact depth there; every split scores seen and unseen pixels apart (what the input
    shows exactly against what any method must invent). Optimisation (``optimized_<N>``
    methods): one run of max(N) steps on the teacher frames of every ``optimize_frame_stride``-th frame of each
    trajectory (frame 0 once) with the exact depths as SSI depth targets (weight 0.2), snapshots after each N
    (so ``optimized_300`` is step 300 of the longer run's schedule, not a separately scheduled 300-step run);
    initialised from the exact RGB-D of frame 0 and of each trajectory's last frame (every 2nd pixel,
    opacity 0.9, scale 0.3 x footprint, as ``benchmarks/bench_optimize.py``), ``optimize_init_points`` of them
    kept at random, 3DGS densification up to ``optimize_max_gaussians``. ``background``: what every
    Gaussian method (optimisation included) composites over: ``input_mean`` (the input frame's mean colour, so
    pixels no Gaussian covers score as the flat baseline does) or Lyra's ``white``.
    """

    path_stride: int = 4
    held_out_views: int = 8
    seed: int = 0
    max_angle_deg: float = 15.0
    held_out_margin: float = 0.25
    room_margin: float = 0.3
    seen_tol: float = 0.02
    optimize_frame_stride: int = 2
    optimize_init_points: int = 20_000
    optimize_max_gaussians: int = 60_000
    optimize_depth_weight: float = 0.2
    backend: str = "torch"
    views_per_chunk: int = 4
    background: str = "input_mean"  # every method's renders composite over it (see lyra_ops.distill)

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise LyraConfigError(f"QualitySettings.background must be one of {', '.join(BACKGROUNDS)}, "
                                  f"got {self.background!r}")
        for name in ("path_stride", "held_out_views", "optimize_frame_stride",
                     "optimize_init_points", "optimize_max_gaussians", "views_per_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "held_out_views" else 1):
                raise LyraConfigError(f"QualitySettings.{name} must be a positive int, got {value!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Targets:
    """The views one split scores: cameras, exact 8-bit ground truth and depth, teacher frames (path split) and
    the masks of the pixels the input frame saw (:func:`seen_by_input`)."""

    split: str
    trajectory: list[str]
    frame: list[int]
    cameras: Cameras
    gt: torch.Tensor  # (N,3,H,W) in [0,1], 8-bit quantised
    depth: torch.Tensor  # (N,1,H,W) exact z-depth
    teacher: torch.Tensor | None = None  # (N,3,H,W) in [0,1]
    seen: torch.Tensor | None = None  # (N,1,H,W) bool

    def __len__(self) -> int:
        return len(self.frame)


@dataclass(frozen=True)
class SceneInputs:
    """What the methods of one scene are built from: the decoder's input views, their exact renders, the input
    frame (frame 0) and the scene's world."""

    scene_id: str
    trajectories: list[str]
    views: list[ViewData]
    exact_rgb: list[torch.Tensor]  # per trajectory (T,3,H,W), float32 in [0,1]
    exact_depth: list[torch.Tensor]  # per trajectory (T,1,H,W)
    input_rgb: torch.Tensor  # (3,H,W) in [0,1]
    input_depth: torch.Tensor  # (H,W) exact
    input_K: torch.Tensor  # (3,3)
    input_c2w: torch.Tensor  # (4,4)
    world: ProceduralScene


@dataclass
class MethodResult:
    """A method's renders of both splits plus its size and timings for the scene."""

    renders: dict[str, RasterOutput]
    gaussians: int
    build_seconds: float
    render_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------------------------


def ceiling_function() -> Callable[..., Gaussians] | None:
    """``lyra_ops.decoder.ceiling_gaussians`` when the decoder module has it, else None."""
    return getattr(decoder_ops, "ceiling_gaussians", None)


def optimized_steps(methods: Iterable[str]) -> list[int]:
    """Step counts of the ``optimized_<N>`` methods, ascending."""
    return sorted({int(m.group(1)) for m in map(_OPTIMIZED.match, methods) if m})


def check_methods(methods: Sequence[str]) -> list[str]:
    """``methods`` validated (known names, ``optimized_<N>`` for any N >= 1), de-duplicated in table order."""
    unknown = [m for m in methods if m not in METHODS and not _OPTIMIZED.match(m)]
    if unknown:
        raise LyraConfigError(f"unknown quality methods {unknown}; valid: {', '.join(METHODS)} (or optimized_<N>)")
    order = {"flat": 0, "rgbd": 1, "rgbd_known": 1.5, "ceiling": 2, "decoder": 4}
    return sorted(set(methods), key=lambda m: (order.get(m, 3), optimized_steps([m])))


def available_methods(methods: Sequence[str]) -> list[str]:
    """``methods`` without ``ceiling`` while ``lyra_ops.decoder.ceiling_gaussians`` does not exist (logged)."""
    methods = check_methods(methods)
    if "ceiling" in methods and ceiling_function() is None:
        log.warning("quality: method 'ceiling' skipped: lyra_ops.decoder has no ceiling_gaussians yet")
        methods = [m for m in methods if m != "ceiling"]
    return methods


def render_gaussians(gaussians: Gaussians, cameras: Cameras, *, backend: str = "torch", views_per_chunk: int = 4,
                     background: torch.Tensor | None = None) -> RasterOutput:
    """Render ``gaussians`` into ``cameras`` over ``background`` (RGB (3,); None: white) with the training
    renderer's near/far; rgb clamped into [0, 1], everything back on the CPU."""
    g = gaussians.detach()
    bg = background if background is not None else torch.tensor(WHITE)
    with torch.no_grad():
        out = rasterize_views_chunked(
            g, cameras.w2c.to(g.device, g.dtype), cameras.K.to(g.device, g.dtype), cameras.width, cameras.height,
            views_per_chunk=views_per_chunk, background=bg.to(g.device, g.dtype), backend=backend, near=RENDER_NEAR,
            far=RENDER_FAR,
        )  # fmt: skip
    return RasterOutput(out.rgb.clamp(0, 1).cpu(), out.depth.cpu(), out.alpha.cpu())


def scene_background(inputs: SceneInputs, settings: QualitySettings) -> torch.Tensor | None:
    """The RGB every Gaussian method of the scene composites over (None: white)."""
    return background_color(inputs.input_rgb, settings.background)


def _render_splits(g: Gaussians, targets: Sequence[Targets], settings: QualitySettings,
                   background: torch.Tensor | None) -> tuple[dict, float]:
    t0 = time.perf_counter()
    renders = {t.split: render_gaussians(g, t.cameras, backend=settings.backend,
                                         views_per_chunk=settings.views_per_chunk, background=background)
               for t in targets}
    return renders, time.perf_counter() - t0


def flat_method(inputs: SceneInputs, targets: Sequence[Targets]) -> MethodResult:
    """The input frame's mean colour everywhere, depth = the plane at its median exact depth, alpha 1."""
    t0 = time.perf_counter()
    level = median_depth(inputs.input_depth)
    renders = {}
    for t in targets:
        h, w = t.cameras.height, t.cameras.width
        rgb = flat_image(inputs.input_rgb, h, w).expand(len(t), 3, h, w)
        renders[t.split] = RasterOutput(rgb, torch.full((len(t), 1, h, w), level), torch.ones(len(t), 1, h, w))
    return MethodResult(renders, 0, 0.0, time.perf_counter() - t0)


def gaussian_method(make: Callable[[], Gaussians], targets: Sequence[Targets], settings: QualitySettings,
                    background: torch.Tensor | None = None) -> MethodResult:
    """Build Gaussians with ``make()`` (timed) and render every split over ``background``."""
    t0 = time.perf_counter()
    g = make()
    build = time.perf_counter() - t0
    renders, render_s = _render_splits(g, targets, settings, background)
    return MethodResult(renders, g.num, build, render_s)


def gaussian_builders(inputs: SceneInputs, model: decoder_ops.LatentGaussianDecoder | None,
                      views: ViewCache) -> dict[str, Callable[[], Gaussians]]:
    """The methods that are one set of Gaussians per scene: ``rgbd``, ``rgbd_known``, ``ceiling`` and ``decoder``."""

    def rgbd() -> Gaussians:
        return rgbd_gaussians(inputs.input_rgb, inputs.input_depth, inputs.input_K, inputs.input_c2w)

    def rgbd_known() -> Gaussians:
        known = inputs.views[0].known_depth
        if known is None:
            raise LyraInputError(f"quality: 'rgbd_known' needs the known depth of {inputs.scene_id}'s input frame")
        fill = model.config.input_depth_fill if model is not None else 0
        depth = fill_from_neighbours(known[0, 0].float(), fill)
        return rgbd_gaussians(inputs.input_rgb, depth, inputs.input_K, inputs.input_c2w)

    def ceiling() -> Gaussians:
        make = ceiling_function()
        if make is None or model is None:
            raise LyraInputError("quality: 'ceiling' needs lyra_ops.decoder.ceiling_gaussians and a decoder model")
        known = [v.known_depth for v in inputs.views]
        return make(model.config, [v.cameras for v in inputs.views], [from_uint8(v.frames) for v in inputs.views],
                    inputs.exact_depth, known_depth_per_view=None if any(k is None for k in known) else known)

    def decoder() -> Gaussians:
        if model is None:
            raise LyraInputError("quality: 'decoder' needs a decoder model")
        return scene_gaussians(model, views, inputs.scene_id, inputs.trajectories)

    return {"rgbd": rgbd, "rgbd_known": rgbd_known, "ceiling": ceiling, "decoder": decoder}


def optimized_methods(inputs: SceneInputs, targets: Sequence[Targets], steps: Sequence[int],
                      settings: QualitySettings) -> dict[str, MethodResult]:
    """One per-scene optimisation of max(steps) steps, scored at each snapshot (``optimized_<N>``)."""
    t0 = time.perf_counter()
    background = scene_background(inputs, settings)
    stride = settings.optimize_frame_stride
    frames, c2w, ks, depths = [], [], [], []
    for i, view in enumerate(inputs.views):
        t = int(view.frames.shape[0])
        picks = list(range(0 if i == 0 else 1, t, stride))
        frames.append(from_uint8(view.frames[picks]))
        c2w.append(view.cameras.c2w[picks])
        ks.append(view.cameras.K[picks])
        depths.append(inputs.exact_depth[i][picks])
    cams = Cameras(torch.cat(c2w), torch.cat(ks), inputs.views[0].cameras.height, inputs.views[0].cameras.width)
    init_views = [(0, 0)] + [(i, int(v.frames.shape[0]) - 1) for i, v in enumerate(inputs.views)]
    init = Gaussians.cat([
        init_gaussians_from_rgbd(from_uint8(inputs.views[i].frames[f]), inputs.exact_depth[i][f, 0],
                                 inputs.views[i].cameras.K[f], inputs.views[i].cameras.c2w[f], stride=2, opacity=0.9,
                                 scale_factor=0.3)
        for i, f in init_views
    ])  # fmt: skip
    config = OptimizeConfig(
        steps=max(steps), init_points=settings.optimize_init_points, densify=True,
        max_gaussians=settings.optimize_max_gaussians, depth_weight=settings.optimize_depth_weight,
        backend=settings.backend, seed=derive_seed(settings.seed, "optimize", inputs.scene_id) % (1 << 31),
        background=tuple(background.tolist()) if background is not None else (1.0, 1.0, 1.0),
    )  # fmt: skip
    snapshots: dict[int, tuple[Gaussians, float]] = {}
    wanted = set(steps)
    prep = time.perf_counter() - t0
    start = time.perf_counter()

    def keep(step: int, _loss: float, g: Gaussians) -> bool:
        if step + 1 in wanted:
            snapshots[step + 1] = (g, prep + time.perf_counter() - start)
        return False

    optimize_scene(torch.cat(frames), cams, init, config, depths=torch.cat(depths), callback=keep)
    out = {}
    for n in steps:
        g, seconds = snapshots[n]
        renders, render_s = _render_splits(g, targets, settings, background)
        out[f"optimized_{n}"] = MethodResult(renders, g.num, seconds, render_s,
                                             {"train_frames": len(cams), "init_gaussians": init.num})
    return out


# ------------------------------------------------------------------------------------------------------------
# Scene data and targets
# ------------------------------------------------------------------------------------------------------------


def load_scene_inputs(store: RunStore, scene_id: str, trajectories: Sequence[str], views: ViewCache,
                      world: ProceduralScene) -> SceneInputs:
    """The decoder's input views of one scene plus the exact renders of all their frames and the input frame."""
    data = [views.get(scene_id, t) for t in trajectories]
    exact_rgb, exact_depth = [], []
    for view in data:
        cams = view.cameras
        render = world.render(cams.c2w, cams.K, cams.height, cams.width)
        exact_rgb.append(render.rgb)
        exact_depth.append(render.depth)
    first = data[0].cameras
    input_rgb = from_uint8(torch.from_numpy(store.read_array(scene_id, "input/rgb")))
    return SceneInputs(scene_id, list(trajectories), data, exact_rgb, exact_depth, input_rgb, exact_depth[0][0, 0],
                       first.K[0], first.c2w[0], world)


def path_targets(inputs: SceneInputs, stride: int, tol: float = 0.02) -> Targets:
    """Every ``stride``-th frame of each trajectory with its exact render (quantised) and its teacher frame."""
    traj, frame, c2w, ks, gt, depth, teacher = [], [], [], [], [], [], []
    for name, view, rgb, dep in zip(inputs.trajectories, inputs.views, inputs.exact_rgb, inputs.exact_depth,
                                    strict=True):
        picks = list(range(0, int(view.frames.shape[0]), stride))
        traj += [name] * len(picks)
        frame += picks
        c2w.append(view.cameras.c2w[picks])
        ks.append(view.cameras.K[picks])
        gt.append(from_uint8(to_uint8(rgb[picks])))
        depth.append(dep[picks])
        teacher.append(from_uint8(view.frames[picks]))
    first = inputs.views[0].cameras
    cams = Cameras(torch.cat(c2w), torch.cat(ks), first.height, first.width)
    depth = torch.cat(depth)
    return Targets(PATH, traj, frame, cams, torch.cat(gt), depth, teacher=torch.cat(teacher),
                   seen=seen_by_input(inputs, cams, depth, tol))


def input_targets(inputs: SceneInputs, tol: float) -> Targets:
    """The input camera itself (frame 0 of the first trajectory): what the input shows, re-rendered."""
    view = inputs.views[0]
    cams = view.cameras[0]
    depth = inputs.exact_depth[0][:1]
    gt = from_uint8(to_uint8(inputs.exact_rgb[0][:1]))
    return Targets(INPUT, [inputs.trajectories[0]], [0], cams, gt, depth, teacher=from_uint8(view.frames[:1]),
                   seen=seen_by_input(inputs, cams, depth, tol))


def seen_by_input(inputs: SceneInputs, cams: Cameras, depth: torch.Tensor, tol: float) -> torch.Tensor:
    """(N,1,H,W) bool: the target pixels (exact z-depth ``depth`` (N,1,H,W) at ``cams``) whose surface the input
    frame saw (:func:`lyra_ops.baselines.seen_mask` against the input's exact depth, relative tolerance ``tol``)."""
    in_depth, in_k, in_c2w = inputs.input_depth[None], inputs.input_K[None], inputs.input_c2w[None]
    return torch.stack([seen_mask(depth[i, 0], cams.K[i], cams.c2w[i], in_depth, in_k, in_c2w, tol)
                        for i in range(len(cams))])[:, None]


def held_out_targets(inputs: SceneInputs, settings: QualitySettings) -> Targets:
    """:func:`held_out_cameras` for the scene, rendered exactly, with the masks of what the input saw."""
    world = inputs.world
    first = inputs.views[0].cameras
    all_c2w = torch.cat([v.cameras.c2w for v in inputs.views])
    room = world.room_bounds
    lo = torch.stack([room[0], room[2], room[4]]) + settings.room_margin
    hi = torch.stack([room[1], room[3], room[5]]) - settings.room_margin
    origin = inputs.input_c2w[:3, 3].to(torch.float64)

    def reachable(points: torch.Tensor) -> torch.Tensor:
        return world.visible_from(points, origin)

    gen = torch.Generator().manual_seed(derive_seed(settings.seed, "held-out-cameras", inputs.scene_id))
    cams = held_out_cameras(all_c2w, inputs.input_c2w, inputs.input_K, first.height, first.width,
                            settings.held_out_views, gen, margin=settings.held_out_margin,
                            max_angle_deg=settings.max_angle_deg, bounds=(lo, hi), accept=reachable)
    render = world.render(cams.c2w, cams.K, cams.height, cams.width)
    seen = seen_by_input(inputs, cams, render.depth, settings.seen_tol)
    n = len(cams)
    return Targets(HELD_OUT, [HELD_OUT] * n, list(range(n)), cams, from_uint8(to_uint8(render.rgb)), render.depth,
                   seen=seen)


# ------------------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------------------


def _chunked(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor,
             size: int = 8) -> list[float]:
    with torch.no_grad():
        return [float(v) for i in range(0, a.shape[0], size) for v in fn(a[i : i + size], b[i : i + size]).flatten()]


def _ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")


def score_rows(scene_id: str, method: str, targets: Targets, result: MethodResult, plane: torch.Tensor, *,
               lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
               sha: str = "") -> list[dict[str, Any]]:
    """One row per target view: the method's render of ``targets.split`` scored against the exact views."""
    out = result.renders[targets.split]
    n, nan = len(targets), [math.nan] * len(targets)
    p = psnr(out.rgb, targets.gt).tolist()
    s = _chunked(_ssim, out.rgb, targets.gt)
    lp = _chunked(lpips, out.rgb, targets.gt) if lpips is not None else nan
    p_t, s_t, l_t = nan, nan, nan
    if targets.teacher is not None:
        p_t = psnr(out.rgb, targets.teacher).tolist()
        s_t = _chunked(_ssim, out.rgb, targets.teacher)
        l_t = _chunked(lpips, out.rgb, targets.teacher) if lpips is not None else nan
    p_seen, p_unseen, frac = nan, nan, nan
    if targets.seen is not None:
        seen = targets.seen.flatten(1)
        frac = seen.float().mean(dim=1).tolist()
        p_seen = psnr(out.rgb, targets.gt, targets.seen).tolist()  # NaN for a view with no such pixel
        p_unseen = psnr(out.rgb, targets.gt, ~targets.seen).tolist()
    d = depth_absrel(out.depth, targets.depth, out.alpha).tolist()
    return [{
        "model_sha256": sha, "scene_id": scene_id, "split": targets.split, "trajectory": targets.trajectory[i],
        "frame": targets.frame[i], "method": method, "psnr": p[i], "ssim": s[i], "lpips": lp[i],
        "psnr_seen": p_seen[i], "psnr_unseen": p_unseen[i], "seen_fraction": frac[i], "psnr_teacher": p_t[i],
        "ssim_teacher": s_t[i],
        "lpips_teacher": l_t[i], "depth_absrel": d[i], "plane_depth_absrel": float(plane[i]),
        "gaussians": result.gaussians, "build_seconds": result.build_seconds, "render_seconds": result.render_seconds,
    } for i in range(n)]  # fmt: skip


def scene_quality_rows(
    store: RunStore,
    scene_id: str,
    model: decoder_ops.LatentGaussianDecoder | None,
    *,
    methods: Sequence[str] = CHEAP_METHODS,
    settings: QualitySettings | None = None,
    views: ViewCache | None = None,
    lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    index: dict[str, list[str]] | None = None,
    sha: str = "",
) -> list[dict[str, Any]]:
    """Rows (schema ``QUALITY_SCHEMA``) of every requested method on both splits of one procedural scene.

    ``model`` is needed by ``decoder`` and ``ceiling`` (its ``DecoderConfig`` sets the grid); the decoder gets
    every trajectory of the scene as input (Lyra's inference). ``ceiling`` is left out (logged) while
    ``lyra_ops.decoder.ceiling_gaussians`` does not exist. Returns [] for scenes without exact ground truth.
    """
    settings = settings or QualitySettings()
    methods = available_methods(methods)
    if model is None and {"decoder", "ceiling"} & set(methods):
        raise LyraInputError("scene_quality_rows: methods 'decoder' and 'ceiling' need a decoder model")
    trajs = (index if index is not None else index_dataset(store).scenes).get(scene_id, [])
    world = procedural_world(store, scene_id)
    if not trajs or world is None or not methods:
        if world is None:
            log.info("quality: %s has no exact ground truth (not procedural): skipped", scene_id)
        return []
    views = views or ViewCache(store, size=len(trajs))
    t0 = time.perf_counter()
    inputs = load_scene_inputs(store, scene_id, trajs, views, world)
    targets = [path_targets(inputs, settings.path_stride, settings.seen_tol)]
    if settings.held_out_views:
        targets.append(held_out_targets(inputs, settings))
    targets.append(input_targets(inputs, settings.seen_tol))
    log.info("quality %s: exact renders and targets in %.1f s", scene_id, time.perf_counter() - t0)
    planes = {t.split: plane_depth(t.depth, inputs.input_depth) for t in targets}
    builders = gaussian_builders(inputs, model, views)
    results: dict[str, MethodResult] = {}
    for method in methods:
        t1 = time.perf_counter()
        if method == "flat":
            results[method] = flat_method(inputs, targets)
        elif method in builders:
            results[method] = gaussian_method(builders[method], targets, settings, scene_background(inputs, settings))
        elif method not in results:  # the optimized_<N> snapshots, all from one run
            results.update(optimized_methods(inputs, targets, optimized_steps(methods), settings))
        log.info("quality %s: %s in %.1f s", scene_id, method, time.perf_counter() - t1)
    rows: list[dict[str, Any]] = []
    for method in methods:
        for t in targets:
            rows += score_rows(scene_id, method, t, results[method], planes[t.split], lpips=lpips, sha=sha)
    return rows


# ------------------------------------------------------------------------------------------------------------
# Summaries
# ------------------------------------------------------------------------------------------------------------


def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _spread(key: str, per_scene: list[float]) -> dict[str, float]:
    """mean, std (sample, over scenes; NaN for one scene), min, max of per-scene means."""
    return {key: statistics.fmean(per_scene),
            f"{key}_std": statistics.stdev(per_scene) if len(per_scene) > 1 else math.nan,
            f"{key}_min": min(per_scene), f"{key}_max": max(per_scene)}


def _methods_in(rows: Sequence[dict[str, Any]]) -> list[str]:
    return check_methods(sorted({r["method"] for r in rows}))


def summary_block(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means and spread over scenes of one group of rows (one split, or one trajectory).

    Keys: ``scenes``, ``frames`` (distinct scored views), ``<method>_<metric>`` with ``_std`` / ``_min`` /
    ``_max`` for every metric that is finite somewhere (each scene's mean over its frames first, then over
    scenes), ``plane_depth_absrel`` (with spread), ``seen_fraction`` where defined, and per method the mean
    ``<method>_build_seconds`` / ``<method>_render_seconds`` per scene and ``<method>_gaussians``.
    """
    scenes = sorted({r["scene_id"] for r in rows})
    views = {(r["scene_id"], r["trajectory"], r["frame"]) for r in rows}
    block: dict[str, Any] = {"scenes": len(scenes), "frames": len(views)}
    by_scene: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by_scene.setdefault((r["method"], r["scene_id"]), []).append(r)
    for method in _methods_in(rows):
        groups = [by_scene[(method, s)] for s in scenes if (method, s) in by_scene]
        for metric in METRICS:
            per_scene = _finite(statistics.fmean(v) if (v := _finite(r[metric] for r in g)) else None
                                for g in groups)
            if per_scene:
                block.update(_spread(f"{method}_{metric}", per_scene))
        for timing in TIMINGS:
            block[f"{method}_{timing}"] = statistics.fmean(g[0][timing] for g in groups)
        block[f"{method}_gaussians"] = statistics.fmean(g[0]["gaussians"] for g in groups)
    one_method = _methods_in(rows)[0] if rows else None
    for key in ("plane_depth_absrel", "seen_fraction"):
        per_scene = _finite(statistics.fmean(v) if (v := _finite(r[key] for r in by_scene.get((one_method, s), [])))
                            else None for s in scenes)
        if per_scene:
            block.update(_spread(key, per_scene))
    return block


def summarize_quality(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"path": block, "held_out": block, "path_per_trajectory": {trajectory: block}}`` (see
    :func:`summary_block`); splits without rows are left out."""
    out: dict[str, Any] = {}
    for split in SPLITS:
        sel = [r for r in rows if r["split"] == split]
        if sel:
            out[split] = summary_block(sel)
    path = [r for r in rows if r["split"] == PATH]
    if path:
        out["path_per_trajectory"] = {t: summary_block([r for r in path if r["trajectory"] == t])
                                      for t in sorted({r["trajectory"] for r in path})}
    return out


TABLE_METRICS = ("psnr", "ssim", "lpips", "depth_absrel", "psnr_seen", "psnr_unseen", "psnr_teacher")


def quality_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (split, method): ``split``, ``method``, ``scenes``, ``frames``, each of ``TABLE_METRICS`` and
    its ``_std`` over scenes (NaN where undefined), ``plane_depth_absrel``, ``build_seconds`` (per scene)."""
    summary = summarize_quality(rows)
    table = []
    for split in SPLITS:
        block = summary.get(split)
        if block is None:
            continue
        for method in _methods_in([r for r in rows if r["split"] == split]):
            row: dict[str, Any] = {"group": f"quality {split} {method}", "split": split, "method": method,
                                   "scenes": block["scenes"], "frames": block["frames"]}
            for metric in TABLE_METRICS:
                row[metric] = block.get(f"{method}_{metric}", math.nan)
                row[f"{metric}_std"] = block.get(f"{method}_{metric}_std", math.nan)
            row["plane_depth_absrel"] = block.get("plane_depth_absrel", math.nan)
            row["build_seconds"] = block.get(f"{method}_build_seconds", math.nan)
            table.append(row)
    return table


PER_SCENE_METRICS = ("psnr", "psnr_seen", "psnr_unseen", "depth_absrel")


def per_scene(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``{split: {scene: {method: {metric: mean over the scene's views}}}}`` for :data:`PER_SCENE_METRICS` (NaN
    where no view defines it, e.g. unseen pixels at the input camera)."""
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["split"], r["scene_id"], r["method"]), []).append(r)
    for (split, scene, method), group in sorted(groups.items()):
        cell = {}
        for metric in PER_SCENE_METRICS:
            values = _finite(r[metric] for r in group)
            cell[metric] = statistics.fmean(values) if values else math.nan
        out.setdefault(split, {}).setdefault(scene, {})[method] = cell
    return out


def margins(rows: Sequence[dict[str, Any]], method: str, baseline: str = "rgbd",
            metric: str = "psnr_seen") -> dict[str, dict[str, float]]:
    """``{split: {scene: method's per-scene mean of metric - baseline's, "min": the smallest}}``: whether a
    method is at least as good as a baseline in every scene (issue 27: seen pixels >= RGB-D's)."""
    table = per_scene(rows)
    out: dict[str, dict[str, float]] = {}
    for split, scenes in table.items():
        diffs = {s: m[method][metric] - m[baseline][metric] for s, m in scenes.items()
                 if method in m and baseline in m and math.isfinite(m[method][metric] - m[baseline][metric])}
        if diffs:
            out[split] = {**diffs, "min": min(diffs.values())}
    return out
