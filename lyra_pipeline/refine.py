"""Per-scene refinement: 3D Gaussians of one stored scene optimised against its teacher frames, resumably.

The decoder is feed-forward (one pass, blurry where the teacher's views disagree); refinement takes its Gaussians
(or the RGB-D point cloud of the input frame and the trajectories' last frames) and runs the per-scene 3DGS
optimisation of :mod:`lyra_ops.optimize` on the scene's teacher frames, with their depth (stage ``video_depth``,
else the warped input depth) as a scale/shift-invariant depth target.

A refinement is named by its content (``refine-<sha12>``: the scene's stored inputs, the initial Gaussians'
bytes and the config) and lives in ``refine/<scene_id>/<name>/`` of the store:

* ``plan.json`` written last by :func:`plan_refine` (the commit marker): config, initialisation, fitted and
  held-out frames;
* ``init.safetensors``: the initial Gaussians (so a resume needs neither the decoder nor its decoding);
* ``checkpoints/step-<N>.safetensors`` + ``step-<N>.json`` (commit marker with its sha256): the complete state of
  :class:`lyra_ops.optimize.SceneOptimizer` after N steps; only the newest is kept;
* ``gaussians.safetensors`` + ``result.json`` (commit marker): the refined Gaussians and PSNR before / after on
  (at most ``HELD_OUT_SCORED``, evenly spaced of) the teacher frames that were not fitted, over white, a mid grey
  and the input's mean colour.

A killed refinement resumes from its newest checkpoint to the same bytes as an uninterrupted one; a finished one
re-run does nothing. No Prefect here (``tasks/refine.py`` wraps these functions; ``flows/refine_scene.py`` chains
them).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lyra_ops import raster_kernel
from lyra_ops.cameras import Cameras
from lyra_ops.distill import background_color
from lyra_ops.errors import LyraInputError, LyraStorageError
from lyra_ops.gaussians import Gaussians
from lyra_ops.images import from_uint8
from lyra_ops.metrics import psnr
from lyra_ops.optimize import OptimizeConfig, SceneOptimizer, init_gaussians_from_rgbd, render_views
from lyra_pipeline.storage import RunStore
from lyra_pipeline.threads import exact_cpu, pin_torch_threads
from lyra_pipeline.training import ViewCache, scene_gaussians, scene_trajectories

REFINE_VERSION = 1
INITS = ("auto", "decoder", "rgbd")
BACKGROUNDS = ("random", "white")
GREY = (0.5, 0.5, 0.5)
WHITE = (1.0, 1.0, 1.0)
GAUSSIAN_FIELDS = ("means", "scales", "quats", "opacities", "colors")
# Held-out teacher frames scored before and after (evenly spaced): 24 of the default 72 cost a third of the renders
# (measured at 176x320, 95k Gaussians, 1 thread: 1.6 CPU s, 5.5% of the 300 steps' 30.0 CPU s, against 6.6 s for
# all 72) and moved the mean PSNR by 0.25-0.45 dB against all 72 (benchmarks/bench_refine.py --timing; its
# results in benchmarks/results/refine.json under "timing").
HELD_OUT_SCORED = 24


@dataclass(frozen=True)
class RefineConfig:
    """What a refinement does.

    ``steps`` optimiser steps (one teacher frame per step); ``init``: ``decoder`` (the decoder's Gaussians),
    ``rgbd`` (one Gaussian per 2nd pixel of the input frame's RGB-D and of each trajectory's last frame with its
    stored depth), ``auto`` (decoder, which always exists: a store's training or the shipped one);
    ``frame_stride``: fit every ``frame_stride``-th frame of each trajectory (frame 0 once), the others are the
    held-out frames of ``result.json``; ``background``: ``random`` (a new random colour behind every fitted view,
    3DGS's ``--random_background``: what the frames show becomes opaque, so the scene looks the same over any
    viewer's background) or ``white`` (Lyra's); ``checkpoint_every`` steps between checkpoints;
    ``max_gaussians`` cap of the densification; ``min_init_opacity`` drops initial Gaussians less opaque than
    this (the decoder emits many that no view needs); ``torch_threads``: torch's intra-op threads for every
    chunk (``None``: the count torch runs at where it is planned, its default in a fresh process). On CPU the
    count is part of the result (it changes the order floats are summed in), so :func:`plan_refine` resolves it
    and records it in ``plan.json``, and every chunk pins the recorded count, whatever process resumes it and
    whatever ran in it before, and runs on torch's deterministic kernels (:func:`lyra_pipeline.threads.exact_cpu`:
    above one thread, atomic adds would make even the same count differ). With the C rasterizer kernel (float32
    CPU) only the kernel runs on the count and torch's ops on one thread (``_compute_threads``), so there the
    count changes the speed, not the bytes. Like ``checkpoint_every`` it is not part of the name: a resume
    continues the refinement at its recorded count. The remaining optimiser settings are
    :class:`lyra_ops.optimize.OptimizeConfig`'s defaults with densification on."""

    steps: int = 300
    init: str = "auto"
    frame_stride: int = 2
    background: str = "random"
    checkpoint_every: int = 100
    max_gaussians: int = 200_000
    min_init_opacity: float = 0.005
    seed: int = 0
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        for name, lo in (("steps", 1), ("frame_stride", 1), ("checkpoint_every", 1), ("max_gaussians", 1),
                         ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise LyraInputError(f"refine {name}: expected an integer >= {lo}, got {value!r}")
        if self.init not in INITS:
            raise LyraInputError(f"--init: expected one of {', '.join(INITS)}, got {self.init!r}")
        if self.background not in BACKGROUNDS:
            raise LyraInputError(f"--background: expected one of {', '.join(BACKGROUNDS)}, got {self.background!r}")
        value = self.min_init_opacity
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
            raise LyraInputError(f"refine min_init_opacity: expected a number in [0, 1), got {value!r}")
        value = self.torch_threads
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise LyraInputError(f"refine torch_threads: expected an integer >= 1 or None, got {value!r}")

    def optimize_config(self) -> OptimizeConfig:
        return OptimizeConfig(
            steps=self.steps, densify=True, max_gaussians=self.max_gaussians, seed=self.seed,
            random_background=self.background == "random",
        )  # fmt: skip


@dataclass(frozen=True)
class SceneTargets:
    """A scene's teacher frames split into the fitted and the held-out ones, with cameras and depth targets."""

    fit_frames: torch.Tensor  # (N,3,H,W) float in [0, 1]
    fit_cameras: Cameras
    fit_depths: torch.Tensor  # (N,1,H,W), 0 where unknown
    held_frames: torch.Tensor
    held_cameras: Cameras
    picks: list[tuple[str, int]]  # (trajectory, frame) of each fitted frame
    held: list[tuple[str, int]]
    input_frame: torch.Tensor  # (3,H,W) uint8 frame 0


def scene_targets(views: ViewCache, scene_id: str, trajectories: list[str], frame_stride: int) -> SceneTargets:
    frames, c2w, ks, depths, picks = [], [], [], [], []
    held_frames, held_c2w, held_k, held = [], [], [], []
    for i, name in enumerate(trajectories):
        view = views.get(scene_id, name)
        t = int(view.frames.shape[0])
        fit = [f for f in range(0 if i == 0 else 1, t, frame_stride)]
        rest = [f for f in range(1, t) if f % frame_stride]
        depth = view.depth if view.depth is not None else torch.zeros(t, 1, *view.frames.shape[2:])
        frames.append(from_uint8(view.frames[fit]))
        c2w.append(view.cameras.c2w[fit])
        ks.append(view.cameras.K[fit])
        depths.append(torch.where(torch.isfinite(depth[fit]), depth[fit], 0.0).float())
        picks += [(name, f) for f in fit]
        held_frames.append(from_uint8(view.frames[rest]))
        held_c2w.append(view.cameras.c2w[rest])
        held_k.append(view.cameras.K[rest])
        held += [(name, f) for f in rest]
    first = views.get(scene_id, trajectories[0])
    h, w = first.cameras.height, first.cameras.width
    return SceneTargets(
        torch.cat(frames), Cameras(torch.cat(c2w), torch.cat(ks), h, w), torch.cat(depths),
        torch.cat(held_frames), Cameras(torch.cat(held_c2w), torch.cat(held_k), h, w), picks, held,
        first.frames[0],
    )  # fmt: skip


def rgbd_init(views: ViewCache, scene_id: str, trajectories: list[str]) -> Gaussians:
    """The input frame and each trajectory's last frame unprojected with their stored depth (2nd pixels, opacity
    0.9, scale 0.3 x footprint: ``lyra_pipeline.quality``'s optimisation baseline; pixels without depth are
    skipped)."""
    parts = []
    for i, name in enumerate(trajectories):
        view = views.get(scene_id, name)
        for f in ([0] if i == 0 else []) + [int(view.frames.shape[0]) - 1]:
            depth = view.depth[f, 0] if view.depth is not None else None
            if f == 0 and (depth is None or not bool((depth > 0).any())):
                depth = view.known_depth[f, 0] if view.known_depth is not None else depth
            if depth is None or not bool((depth > 0).any()):
                continue
            parts.append(init_gaussians_from_rgbd(from_uint8(view.frames[f]), depth, view.cameras.K[f],
                                                  view.cameras.c2w[f], stride=2, opacity=0.9, scale_factor=0.3))
    if not parts:
        raise LyraInputError(f"scene {scene_id!r}: no frame has a stored depth to start --init rgbd from")
    return Gaussians.cat(parts)


def initial_gaussians(views: ViewCache, scene_id: str, trajectories: list[str], config: RefineConfig,
                      decoder=None) -> Gaussians:
    """The Gaussians a refinement starts from: the decoder's (``init`` ``decoder`` / ``auto``) or the RGB-D point
    cloud (``rgbd``), without those less opaque than ``config.min_init_opacity`` (kept whole if that drops all)."""
    if config.init == "rgbd":
        init = rgbd_init(views, scene_id, trajectories)
    else:
        if decoder is None:
            raise LyraInputError("refine --init decoder needs a decoder (none was given)")
        init = scene_gaussians(decoder, views, scene_id, trajectories).detach().to("cpu", torch.float32)
    keep = init.opacities >= config.min_init_opacity
    return init.index(torch.nonzero(keep).squeeze(1)) if bool(keep.any()) else init


def gaussian_bytes(g: Gaussians, metadata: dict[str, str] | None = None) -> bytes:
    return st_save({name: getattr(g, name).detach().cpu().float().contiguous() for name in GAUSSIAN_FIELDS},
                   metadata=metadata)


def gaussians_from_bytes(data: bytes, source: str) -> Gaussians:
    try:
        tensors = st_load(data)
        return Gaussians(**{name: tensors[name] for name in GAUSSIAN_FIELDS})
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a corrupt file
        raise LyraStorageError(f"{source}: not a Gaussians safetensors file ({type(exc).__name__}: {exc})") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------------------------


def refine_rel(scene_id: str, name: str, *parts: str) -> str:
    return "/".join(("refine", scene_id, name, *parts))


def checkpoint_rel(scene_id: str, name: str, step: int, suffix: str) -> str:
    return refine_rel(scene_id, name, "checkpoints", f"step-{step:08d}{suffix}")


# ------------------------------------------------------------------------------------------------------------
# Plan, chunk, finish
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefinePlan:
    scene_id: str
    name: str
    config: RefineConfig
    init: str  # what the initial Gaussians are ("decoder: <source>" or "rgbd")
    trajectories: list[str]


def plan_refine(store: RunStore, scene_id: str, config: RefineConfig, decoder=None,
                decoder_source: str = "") -> RefinePlan:
    """Create (or find) the refinement of ``scene_id`` for ``config``: its initial Gaussians and ``plan.json``.
    ``decoder`` is needed for ``init`` ``decoder`` / ``auto``. Validates everything before writing. The thread
    count is resolved here (``config.torch_threads``, else the count torch runs at now) and the decoder runs at
    it."""
    config = replace(config, torch_threads=config.torch_threads or torch.get_num_threads())
    pin_torch_threads(config.torch_threads)
    trajectories = scene_trajectories(store, scene_id)
    views = ViewCache(store, size=len(trajectories))
    init = initial_gaussians(views, scene_id, trajectories, config, decoder)
    described = "rgbd" if config.init == "rgbd" else f"decoder: {decoder_source}"
    init_bytes = gaussian_bytes(init)
    done = store.done_keys()
    inputs = {t: [done.get((scene_id, t, stage), "") for stage in ("cameras", "generate", "video_depth")]
              for t in trajectories}
    content = {"version": REFINE_VERSION, "scene": scene_id, "inputs": inputs, "init_sha256": sha256_hex(init_bytes),
               "config": {k: v for k, v in asdict(config).items()
                          if k not in ("checkpoint_every", "torch_threads")}}  # how it runs: recorded, not named
    name = "refine-" + sha256_hex(json.dumps(content, sort_keys=True).encode())[:12]
    plan = RefinePlan(scene_id, name, config, described, trajectories)
    if store.read_file(refine_rel(scene_id, name, "plan.json")) is None:
        store.check_writable()
        store.write_file(refine_rel(scene_id, name, "init.safetensors"), init_bytes)
        doc = {**content, "name": name, "init": described, "trajectories": trajectories,
               "init_gaussians": init.num, "config": asdict(config), "created_at": time.time()}
        store.write_file(refine_rel(scene_id, name, "plan.json"), json.dumps(doc, indent=1).encode())
    return plan


def load_plan(store: RunStore, scene_id: str, name: str) -> tuple[RefinePlan, dict[str, Any]]:
    data = store.read_file(refine_rel(scene_id, name, "plan.json"))
    if data is None:
        raise LyraStorageError(f"{store.url}: refinement {scene_id}/{name} has no plan.json (run plan_refine first)")
    doc = json.loads(data)
    return RefinePlan(scene_id, name, RefineConfig(**doc["config"]), doc["init"], doc["trajectories"]), doc


def checkpoint_steps(store: RunStore, scene_id: str, name: str) -> list[int]:
    """Steps of the committed checkpoints (those with their ``.json``), ascending."""
    steps = []
    for entry in store.list_names(refine_rel(scene_id, name, "checkpoints")):
        if entry.startswith("step-") and entry.endswith(".json") and entry[5:-5].isdigit():
            steps.append(int(entry[5:-5]))
    return sorted(steps)


def chunk_ends(config: RefineConfig) -> list[int]:
    ends = list(range(config.checkpoint_every, config.steps, config.checkpoint_every))
    return [*ends, config.steps]


def _optimizer(store: RunStore, plan: RefinePlan, targets: SceneTargets) -> SceneOptimizer:
    init = gaussians_from_bytes(store.read_file(refine_rel(plan.scene_id, plan.name, "init.safetensors")) or b"",
                                f"{store.url}/{refine_rel(plan.scene_id, plan.name, 'init.safetensors')}")
    return SceneOptimizer(targets.fit_frames, targets.fit_cameras, init, plan.config.optimize_config(),
                          depths=targets.fit_depths)


def _load_checkpoint(store: RunStore, plan: RefinePlan, step: int) -> dict[str, torch.Tensor]:
    meta = json.loads(store.read_file(checkpoint_rel(plan.scene_id, plan.name, step, ".json")))
    rel = checkpoint_rel(plan.scene_id, plan.name, step, ".safetensors")
    data = store.read_file(rel)
    if data is None or sha256_hex(data) != meta["sha256"]:
        raise LyraStorageError(f"{store.url}/{rel} is missing or does not match its .json (corrupt); delete both "
                               "files to resume from the previous checkpoint")
    return st_load(data)


@contextmanager
def _compute_threads(threads: int) -> Iterator[None]:
    """How a refinement's steps use ``threads`` (its recorded count): with the C rasterizer kernel (float32 CPU:
    :mod:`lyra_ops.raster_kernel`, where most of a step's time goes) the kernel runs on ``threads`` and torch's
    many small per-step ops on one thread (measured on 2 cores at load ~11, 63k Gaussians, 176x320: 0.37 s/step
    against 2.0 s/step with torch's OpenMP ops on 2 threads spinning and waiting at their barriers; the kernel's
    bytes do not depend on its thread count, so the result does not either: 1 and 2 threads ended with the same
    held-out PSNR to the last digit). Without the kernel, everything on ``threads``. Deterministic kernels
    either way (:func:`lyra_pipeline.threads.exact_cpu`: above one thread, torch's backward adds with atomics
    else)."""
    ops = 1 if raster_kernel.kernel() is not None else threads
    try:
        with exact_cpu(ops), raster_kernel.use_threads(threads):
            yield
    finally:
        pin_torch_threads(threads)  # the refinement's count stays pinned afterwards, as for every computation


def refine_until(store: RunStore, scene_id: str, name: str, until: int) -> dict[str, Any]:
    """Advance the refinement to step ``until`` from its newest checkpoint (nothing when already there) and
    checkpoint; returns ``{"step", "computed", "seconds", "loss"}``."""
    plan, _ = load_plan(store, scene_id, name)
    until = min(until, plan.config.steps)
    steps = checkpoint_steps(store, scene_id, name)
    if steps and steps[-1] >= until:  # already there (or beyond: only the newest checkpoint is kept)
        return {"step": steps[-1], "computed": 0, "seconds": 0.0}
    start = steps[-1] if steps else 0
    pin_torch_threads(plan.config.torch_threads)  # the count recorded when planned, not this process's
    views = ViewCache(store, size=len(plan.trajectories))
    targets = scene_targets(views, scene_id, plan.trajectories, plan.config.frame_stride)
    opt = _optimizer(store, plan, targets)
    previous = 0.0
    if start:
        opt.load_state_tensors(_load_checkpoint(store, plan, start))
        previous = json.loads(store.read_file(checkpoint_rel(scene_id, name, start, ".json")))["total_seconds"]
    t0 = time.perf_counter()
    with _compute_threads(plan.config.torch_threads):
        losses = opt.run(until)
    seconds = time.perf_counter() - t0
    data = st_save(opt.state_tensors())
    store.write_file(checkpoint_rel(scene_id, name, until, ".safetensors"), data)
    meta = {"step": until, "sha256": sha256_hex(data), "gaussians": opt.params.num, "seconds": seconds,
            "total_seconds": previous + seconds, "loss_first": losses[0] if losses else math.nan,
            "loss_last": losses[-1] if losses else math.nan, "saved_at": time.time()}
    store.write_file(checkpoint_rel(scene_id, name, until, ".json"), json.dumps(meta).encode())
    for old in steps:  # keep only the newest committed checkpoint
        store.remove_tree(checkpoint_rel(scene_id, name, old, ".json"))
        store.remove_tree(checkpoint_rel(scene_id, name, old, ".safetensors"))
    return {"step": until, "computed": until - start, "seconds": seconds, "loss": meta["loss_last"],
            "gaussians": opt.params.num}


def held_out_psnr(g: Gaussians, targets: SceneTargets,
                  backgrounds: dict[str, tuple[float, float, float]]) -> dict[str, float]:
    """Mean PSNR (dB) of ``g`` against the held-out teacher frames over each of ``backgrounds`` (one render over
    black, composited: the rasterizer's colour is premultiplied, so C_bg = C_black + (1 - alpha) bg exactly)."""
    if targets.held_frames.shape[0] == 0:
        return {k: math.nan for k in backgrounds}
    out = render_views(g, targets.held_cameras, background=(0.0, 0.0, 0.0), batch_views=8)
    scores = {}
    for key, bg in backgrounds.items():
        rgb = out.rgb + (1.0 - out.alpha) * torch.tensor(bg, dtype=out.rgb.dtype)[None, :, None, None]
        scores[key] = float(psnr(rgb.clamp(0, 1), targets.held_frames).mean())
    return scores


def scored_held_out(targets: SceneTargets, most: int = HELD_OUT_SCORED) -> SceneTargets:
    """``targets`` with at most ``most`` of its held-out frames, evenly spaced (every ceil(n / most)-th)."""
    n = targets.held_frames.shape[0]
    step = max(1, math.ceil(n / most))
    if step == 1:
        return targets
    keep = list(range(0, n, step))
    cams = targets.held_cameras
    return replace(targets, held_frames=targets.held_frames[keep],
                   held_cameras=Cameras(cams.c2w[keep], cams.K[keep], cams.height, cams.width),
                   held=[targets.held[i] for i in keep])


def finish_refine(store: RunStore, scene_id: str, name: str) -> dict[str, Any]:
    """Write the refined Gaussians and ``result.json`` (PSNR before/after on the held-out teacher frames over
    white and grey); returns the result (read back when already written)."""
    existing = store.read_file(refine_rel(scene_id, name, "result.json"))
    if existing is not None:
        return json.loads(existing)
    plan, doc = load_plan(store, scene_id, name)
    steps = checkpoint_steps(store, scene_id, name)
    if not steps or steps[-1] != plan.config.steps:
        raise LyraStorageError(f"{store.url}: refinement {scene_id}/{name} has not reached step "
                               f"{plan.config.steps} (checkpoints: {steps}); run it to the end first")
    pin_torch_threads(plan.config.torch_threads)
    views = ViewCache(store, size=len(plan.trajectories))
    targets = scene_targets(views, scene_id, plan.trajectories, plan.config.frame_stride)
    opt = _optimizer(store, plan, targets)
    init = opt.gaussians()
    opt.load_state_tensors(_load_checkpoint(store, plan, steps[-1]))
    refined = opt.gaussians()
    data = gaussian_bytes(refined)
    store.write_file(refine_rel(scene_id, name, "gaussians.safetensors"), data)
    backgrounds = {"white": WHITE, "grey": GREY,
                   "input_mean": tuple(background_color(targets.input_frame, "input_mean").tolist())}
    held_out_total = len(targets.held)
    targets = scored_held_out(targets)
    with _compute_threads(plan.config.torch_threads):
        before, after = held_out_psnr(init, targets, backgrounds), held_out_psnr(refined, targets, backgrounds)
    seconds = json.loads(store.read_file(checkpoint_rel(scene_id, name, steps[-1], ".json")))["total_seconds"]
    result = {"scene": scene_id, "name": name, "init": plan.init, "steps": plan.config.steps,
              "fitted_frames": len(targets.picks), "held_out_frames": len(targets.held),
              "held_out_total": held_out_total,
              "gaussians_before": init.num, "gaussians_after": refined.num,
              "psnr_before": before, "psnr_after": after, "sha256": sha256_hex(data),
              "optimize_seconds": seconds, "init_gaussians": doc.get("init_gaussians")}
    store.write_file(refine_rel(scene_id, name, "result.json"), json.dumps(result, indent=1).encode())
    return result


def refined_gaussians(store: RunStore, scene_id: str, name: str) -> Gaussians:
    rel = refine_rel(scene_id, name, "gaussians.safetensors")
    data = store.read_file(rel)
    if data is None:
        raise LyraStorageError(f"{store.url}/{rel} not found: the refinement has not finished")
    return gaussians_from_bytes(data, f"{store.url}/{rel}")


def refine_scene_inprocess(store: RunStore, scene_id: str, config: RefineConfig, decoder=None,
                           decoder_source: str = "", log=None) -> tuple[RefinePlan, dict[str, Any]]:
    """Plan, every chunk, finish: the whole refinement in this process (what ``lyra reconstruct --refine``
    runs; the Prefect flow ``refine-scene`` runs the same steps as tasks)."""
    plan = plan_refine(store, scene_id, config, decoder, decoder_source)
    if log is not None and store.read_file(refine_rel(scene_id, plan.name, "result.json")) is not None:
        log(f"refine {scene_id}: {plan.name} reused (its {config.steps} steps finished earlier; nothing recomputed)")
    for end in chunk_ends(config):
        done = refine_until(store, scene_id, plan.name, end)
        if log is not None and done["computed"]:
            log(f"refine {scene_id}: step {done['step']}/{config.steps} ({done['seconds']:.0f} s, "
                f"{done['gaussians']} Gaussians)")
    return plan, finish_refine(store, scene_id, plan.name)
