"""Dynamic decoder quality (issue 16): held-out dynamic scenes at query times, on cameras no model saw.

For each held-out scene and query frame ``f`` (time ``tau_f``) the scene is rendered exactly (``DynamicScene``) at

- ``held_out``: random cameras around the input camera at that time (:func:`lyra_ops.baselines.held_out_cameras`
  over the region of every path's cameras, turned at most ``max_angle_deg`` from the input camera at ``f``), and
- ``flip``: the flipped paths' frame ``f`` (camera ``M_{T-1-f} w2c_in_f``: a pose the forward paths reach only at
  another time; teacher frames of these paths are never decoder inputs),

and scored for these methods, all composited over the input frame's mean colour:

- ``flat``: the input frame's mean colour;
- ``rgbd``: the input frame at ``f`` unprojected with its depth (no learning);
- ``static``: a static decoder applied at that frame (:meth:`LatentGaussianDecoder.forward_at` without time
  embedding: the same inputs and Gaussian layout, weights trained on static scenes only);
- ``dynamic``: the time-conditioned decoder;
- ``optimized_<N>``: per-frame per-scene optimisation for N steps on the frames that exist at that time (the
  input frame and the forward paths' frame ``f``, with their depth), initialised from the input's unprojection.

Metrics: PSNR over the whole image and over the pixels of moving objects (exact object ids), and the AbsRel of
the rendered depth against the exact depth.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lyra_ops.baselines import depth_absrel, flat_image, held_out_cameras, rgbd_gaussians
from lyra_ops.cameras import Cameras
from lyra_ops.decoder import DecoderConfig, LatentGaussianDecoder, ceiling_gaussians, query_frames
from lyra_ops.distill import ViewData, background_color
from lyra_ops.dynamic import DynamicScene, make_dynamic_scene
from lyra_ops.errors import LyraInputError
from lyra_ops.gaussians import Gaussians
from lyra_ops.images import from_uint8, to_uint8
from lyra_ops.metrics import psnr
from lyra_ops.optimize import OptimizeConfig, init_gaussians_from_rgbd, optimize_scene
from lyra_ops.seeding import derive_seed
from lyra_pipeline.config import FLIP_SUFFIX, DynamicConfig
from lyra_pipeline.quality import render_gaussians
from lyra_pipeline.storage import RunStore
from lyra_pipeline.training import (
    INPUT_TIMES,
    ViewCache,
    forward_paths,
    scene_gaussians_at,
    scene_trajectories,
)

log = logging.getLogger(__name__)
SPLITS = ("held_out", "flip")


@dataclass(frozen=True)
class DynamicQualitySettings:
    frames: tuple[int, ...] = (3, 12, 21)  # query frames (input frame indices)
    held_out_views: int = 6
    max_angle_deg: float = 15.0
    held_out_margin: float = 0.25
    room_margin: float = 0.3
    optimize_steps: tuple[int, ...] = (300,)
    optimize_max_gaussians: int = 60000
    moving: int | None = None  # moving objects per procedural scene (None: the store's dynamic.moving)
    ceiling: DecoderConfig | None = None  # score this decoder layout's exact-data ceiling too (None: not)
    backend: str = "torch"
    seed: int = 0


@dataclass(frozen=True)
class FrameTargets:
    split: str
    cameras: Cameras
    rgb: torch.Tensor  # (N,3,H,W) in [0,1], quantised like the stored frames
    depth: torch.Tensor  # (N,1,H,W) exact z-depth
    moving: torch.Tensor  # (N,1,H,W) bool: pixels of moving objects


def store_moving(store: RunStore) -> int:
    """``dynamic.moving`` of the newest ``lyra run`` on the store that recorded one, else the default."""
    for summary in reversed(store.run_summaries()):
        value = ((summary.get("config") or {}).get("dynamic") or {}).get("moving")
        if isinstance(value, int):
            return value
    return DynamicConfig().moving


def dynamic_world(store: RunStore, scene_id: str, moving: int | None = None) -> DynamicScene:
    """The exact dynamic scene behind ``scene_id`` (``moving`` objects; None: :func:`store_moving`), checked
    against the stored input video (it must render the first and last input frames back to within one grey level,
    else the ``moving`` count or the seed is not the store's)."""
    record = next((r for r in store.read_prompts() if r["scene_id"] == scene_id), None)
    if record is None or record["source"] != "dynamic":
        raise LyraInputError(f"{store.url}: scene {scene_id!r} is not a procedural dynamic scene (no exact truth)")
    moving = store_moving(store) if moving is None else moving
    world = make_dynamic_scene(int(record["seed"]), moving=moving)
    rgb = torch.from_numpy(store.read_array(scene_id, "input/video/rgb"))
    c2w = torch.from_numpy(store.read_array(scene_id, "input/video/c2w")).float()
    K = torch.from_numpy(store.read_array(scene_id, "input/video/K")).float()
    times = torch.from_numpy(store.read_array(scene_id, INPUT_TIMES))
    last = len(times) - 1
    check = world.render(c2w[[0, last]], K[[0, last]], int(rgb.shape[2]), int(rgb.shape[3]), times[[0, last]])
    diff = (to_uint8(check.rgb).int() - rgb[[0, last]].int()).abs().max()
    if int(diff) > 1:
        raise LyraInputError(f"{store.url}: scene {scene_id!r} does not render back from seed {record['seed']} with "
                             f"{moving} moving objects (max difference {int(diff)}); pass the store's dynamic.moving")
    return world


def frame_targets(world: DynamicScene, names: list[str], scene_id: str, views: ViewCache, frame: int,
                  settings: DynamicQualitySettings) -> list[FrameTargets]:
    """The ``held_out`` and ``flip`` targets of one scene (trajectories ``names``) at input frame ``frame``
    (exact renders)."""
    input_view, times = views.input_view(scene_id)
    tau = float(times[frame])
    moving_ids = {m.obj_id for m in world.motions}
    first = input_view.cameras
    all_c2w = torch.cat([views.get(scene_id, n).cameras.c2w for n in names] + [first.c2w])
    scene_at = world.at(tau)
    room = scene_at.room_bounds
    lo = torch.stack([room[0], room[2], room[4]]) + settings.room_margin
    hi = torch.stack([room[1], room[3], room[5]]) - settings.room_margin
    origin = first.c2w[frame, :3, 3].to(torch.float64)
    gen = torch.Generator().manual_seed(derive_seed(settings.seed, "dynamic-held-out", scene_id, frame))
    held = held_out_cameras(all_c2w, first.c2w[frame], first.K[frame], first.height, first.width,
                            settings.held_out_views, gen, margin=settings.held_out_margin,
                            max_angle_deg=settings.max_angle_deg, bounds=(lo, hi),
                            accept=lambda p: scene_at.visible_from(p, origin))
    flips = [views.get(scene_id, n).cameras for n in names if n.endswith(FLIP_SUFFIX)]
    out = [("held_out", held)]
    if flips:
        out.append(("flip", Cameras(torch.stack([c.c2w[frame] for c in flips]),
                                    torch.stack([c.K[frame] for c in flips]), first.height, first.width)))
    targets = []
    for split, cams in out:
        render = world.render(cams.c2w, cams.K, cams.height, cams.width, [tau] * len(cams))
        moving = torch.zeros_like(render.depth, dtype=torch.bool)
        for obj in moving_ids:
            moving |= render.object_id == obj
        targets.append(FrameTargets(split, cams, from_uint8(to_uint8(render.rgb)), render.depth, moving))
    return targets


def _scores(rgb: torch.Tensor, depth: torch.Tensor | None, alpha: torch.Tensor | None,
            t: FrameTargets) -> dict[str, float]:
    """Mean over views of PSNR (whole image; moving-object pixels, views with at least 16 of them) and the
    rendered depth's AbsRel (pixels with alpha > 0.5)."""
    per_view = psnr(rgb, t.rgb).tolist()
    has = [i for i in range(len(rgb)) if int(t.moving[i].sum()) >= 16]
    moving = psnr(rgb[has], t.rgb[has], t.moving[has]).tolist() if has else []
    out = {"psnr": sum(per_view) / len(per_view), "views": len(per_view),
           "moving_psnr": sum(moving) / len(moving) if moving else math.nan, "moving_views": len(moving)}
    if depth is not None:
        rel = [v for v in depth_absrel(depth, t.depth, alpha).tolist() if math.isfinite(v)]
        out["depth_absrel"] = sum(rel) / len(rel) if rel else math.nan
    return out


def ceiling_at(config: DecoderConfig, world: DynamicScene, views: list[ViewData], times: torch.Tensor,
               frame: int) -> Gaussians:
    """The exact-data ceiling of the layout ``config`` decodes at input frame ``frame`` (view 0 the input video,
    then the forward paths): Gaussians on its rays at the exact depth of each frame's own time, coloured by the
    frames (exact: the input video and oracle teacher frames), dropped where the decoder would drop them."""
    t_l = (len(views[0].cameras) - 1) // config.temporal_factor + 1
    used = query_frames(config, t_l, frame)
    depths = []
    for view in views:
        depth = torch.zeros(len(view.cameras), 1, view.cameras.height, view.cameras.width)
        cams = view.cameras
        depth[used] = world.render(cams.c2w[used], cams.K[used], cams.height, cams.width, times[used]).depth
        depths.append(depth)
    return ceiling_gaussians(config, [v.cameras for v in views], [from_uint8(v.frames) for v in views], depths,
                             known_depth_per_view=[v.known_depth for v in views], frame=frame)


def optimized_frame(views: ViewCache, scene_id: str, forward: Sequence[str], frame: int, steps: Sequence[int],
                    settings: DynamicQualitySettings, background: torch.Tensor) -> dict[int, tuple[Gaussians, float]]:
    """Per-frame per-scene optimisation at input frame ``frame`` on the frames that exist at that time: the input
    frame and every forward path's frame ``frame`` (teacher frames, with their depth); snapshots at ``steps``."""
    input_view, _ = views.input_view(scene_id)
    sources = [input_view] + [views.get(scene_id, n) for n in forward]
    frames = torch.stack([from_uint8(v.frames[frame]) for v in sources])
    depths = torch.stack([v.depth[frame] for v in sources])
    cams = Cameras(torch.stack([v.cameras.c2w[frame] for v in sources]),
                   torch.stack([v.cameras.K[frame] for v in sources]), input_view.cameras.height,
                   input_view.cameras.width)
    init = init_gaussians_from_rgbd(frames[0], input_view.depth[frame, 0], cams.K[0], cams.c2w[0], stride=2,
                                    opacity=0.9, scale_factor=0.3)
    config = OptimizeConfig(steps=max(steps), densify=True, max_gaussians=settings.optimize_max_gaussians,
                            depth_weight=0.2, backend=settings.backend,
                            seed=derive_seed(settings.seed, "dynamic-optimize", scene_id, frame) % (1 << 31),
                            background=tuple(background.tolist()))
    snapshots: dict[int, tuple[Gaussians, float]] = {}
    start = time.perf_counter()

    def keep(step: int, _loss: float, g: Gaussians) -> bool:
        if step + 1 in steps:
            snapshots[step + 1] = (g, time.perf_counter() - start)
        return False

    optimize_scene(frames, cams, init, config, depths=depths, callback=keep)
    return snapshots


def scene_rows(store: RunStore, scene_id: str, models: dict[str, LatentGaussianDecoder],
               settings: DynamicQualitySettings, views: ViewCache | None = None) -> list[dict[str, Any]]:
    """One row per (query frame, split, method) of one held-out scene."""
    views = views or ViewCache(store)
    world = dynamic_world(store, scene_id, settings.moving)
    names = scene_trajectories(store, scene_id)
    forward = forward_paths(names)
    input_view, times = views.input_view(scene_id)
    paths = [views.get(scene_id, n) for n in forward]
    rows = []
    for frame in settings.frames:
        if not 0 <= frame < len(times):
            raise LyraInputError(f"query frame {frame}: the scene has {len(times)} frames")
        targets = frame_targets(world, names, scene_id, views, frame, settings)
        background = background_color(input_view.frames[frame], "input_mean")
        results: dict[str, tuple[Gaussians | None, float]] = {"flat": (None, 0.0)}
        t0 = time.perf_counter()
        results["rgbd"] = (rgbd_gaussians(from_uint8(input_view.frames[frame]), input_view.depth[frame],
                                          input_view.cameras.K[frame], input_view.cameras.c2w[frame]),
                           time.perf_counter() - t0)
        for name, model in models.items():
            t0 = time.perf_counter()
            results[name] = (scene_gaussians_at(model, views, scene_id, forward, frame), time.perf_counter() - t0)
        if settings.ceiling is not None:
            t0 = time.perf_counter()
            results["ceiling"] = (ceiling_at(settings.ceiling, world, [input_view, *paths], times, frame),
                                  time.perf_counter() - t0)
        if settings.optimize_steps:
            for n, (g, seconds) in optimized_frame(views, scene_id, forward, frame, settings.optimize_steps, settings,
                                                   background).items():
                results[f"optimized_{n}"] = (g, seconds)
        for name, (g, seconds) in results.items():
            for t in targets:
                if g is None:
                    flat = flat_image(from_uint8(input_view.frames[frame]), t.cameras.height, t.cameras.width)
                    scores = _scores(flat[None].expand(len(t.cameras), -1, -1, -1), None, None, t)
                else:
                    out = render_gaussians(g.to("cpu"), t.cameras, backend=settings.backend, background=background)
                    scores = _scores(out.rgb, out.depth, out.alpha, t)
                rows.append({"scene": scene_id, "frame": frame, "time": float(times[frame]), "split": t.split,
                             "method": name, "gaussians": 0 if g is None else g.num, "build_seconds": seconds,
                             **scores})
        log.info("dynamic quality %s frame %d: %s", scene_id, frame,
                 ", ".join(f"{r['method']} {r['split']} {r['psnr']:.2f}" for r in rows[-len(results) * len(targets):]))
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean (and spread over scenes) per split and method."""
    table = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for split in SPLITS:
        for method in methods:
            sel = [r for r in rows if r["split"] == split and r["method"] == method]
            if not sel:
                continue
            entry: dict[str, Any] = {"split": split, "method": method, "scenes": len({r["scene"] for r in sel}),
                                     "frames": len({(r["scene"], r["frame"]) for r in sel}),
                                     "views": sum(r["views"] for r in sel)}
            for key in ("psnr", "moving_psnr", "depth_absrel", "build_seconds", "gaussians"):
                vals = [r[key] for r in sel if key in r and r[key] is not None and math.isfinite(r[key])]
                if vals:
                    entry[key] = sum(vals) / len(vals)
                    per_scene = {}
                    for r in sel:
                        if key in r and r[key] is not None and math.isfinite(r[key]):
                            per_scene.setdefault(r["scene"], []).append(r[key])
                    means = [sum(v) / len(v) for v in per_scene.values()]
                    entry[f"{key}_min_scene"], entry[f"{key}_max_scene"] = min(means), max(means)
            table.append(entry)
    return table
