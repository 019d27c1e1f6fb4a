"""Generating a path longer than the video model's clip, clip by clip (Lyra-2 / GEN3C's long-video generation).

A path of ``N`` frames is covered by clips of ``L = video.num_frames`` frames that overlap by one frame: clip
``c`` starts at ``s_c = c (L - 1)`` (the last one at ``N - L`` when ``L - 1`` does not divide ``N - 1``). Each clip
is conditioned on the 3D cache warped into its cameras, its first frame being the last frame generated before it:

- clip 0: the cache is the input frame with its depth: the stored ``warp`` / ``refine`` frames;
- clip ``c > 0``: the cache is the input frame and the previous clip's last frame ``s_c``, with that frame's
  depth from the configured estimator, scaled to the depth the cache already predicts there (the median ratio
  to the warped depth; the exact depth for procedural scenes). Each source is warped into the clip's cameras and
  the sources' points are splatted together (``forward_warp_sources``: depth- and bilinear-weighted, as one
  frame's pixels are) and the mask refined against each source's seam mesh in turn.

Frames are written into ``teacher/rgb`` clip by clip; its attributes ``clips_done`` and ``unit_key`` make the
unit resumable per clip (a killed generation restarts at its first unfinished clip, under the same key only),
and ``clip_starts`` records where each clip began.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from lyra_ops.cameras import Cameras
from lyra_ops.depth import align_depth_scale, postprocess_depth
from lyra_ops.images import from_uint8, to_signed, to_uint8
from lyra_ops.mask_refine import refine_mask_conservative
from lyra_ops.prompts import SceneRecord
from lyra_ops.seeding import derive_seed
from lyra_ops.warp import depth_reliability_mask, forward_warp, forward_warp_sources, unproject_depth
from lyra_pipeline.backends import depth_estimator
from lyra_pipeline.config import RunConfig, edge_threshold, mesh_downsample
from lyra_pipeline.storage import RunStore

log = logging.getLogger(__name__)
IDENTITY = torch.eye(4)


def clip_starts(frames: int, clip: int) -> list[int]:
    """First frame of every clip covering ``frames`` frames with ``clip``-frame clips overlapping by one."""
    if frames <= clip:
        return [0]
    starts = list(range(0, frames - clip + 1, clip - 1))
    if starts[-1] + clip < frames:
        starts.append(frames - clip)
    return starts


def _warp_source(src: dict, cams: Cameras, config: RunConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One cache source warped into ``cams``: (rgb in [-1,1], depth, conservative mask), each (T,C,H,W)."""
    warp = forward_warp(to_signed(src["rgb"]), src["depth"], src["K"], src["c2w"], cams.K, cams.w2c,
                        source_mask=src["reliable"], depth_weight_scale=config.warp.depth_weight_scale)
    mask = warp.mask
    if config.mask.refine:
        points = unproject_depth(src["depth"], src["K"], src["c2w"])
        mask = refine_mask_conservative(warp, points, ~src["reliable"], cams.w2c, cams.K,
                                        threshold=config.mask.threshold, factor=mesh_downsample(config)).mask
    return warp.rgb, warp.depth, mask


def _cache_warp(sources: list[dict], cams: Cameras, config: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache rendered into ``cams``: every source's points splatted together (depth- and bilinear-weighted,
    as one frame's pixels are), the mask refined against each source's seam mesh in turn: (warped (T,3,H,W) in
    [-1,1] with holes -1, mask (T,1,H,W) bool)."""
    warp = forward_warp_sources([to_signed(s["rgb"]) for s in sources], [s["depth"] for s in sources],
                                [s["K"] for s in sources], [s["c2w"] for s in sources], cams.K, cams.w2c,
                                source_masks=[s["reliable"] for s in sources],
                                depth_weight_scale=config.warp.depth_weight_scale)
    if config.mask.refine:
        for src in sources:
            points = unproject_depth(src["depth"], src["K"], src["c2w"])
            warp = refine_mask_conservative(warp, points, ~src["reliable"], cams.w2c, cams.K,
                                            threshold=config.mask.threshold, factor=mesh_downsample(config))
    return torch.where(warp.mask, warp.rgb, -1.0), warp.mask


def _frame_depth(config: RunConfig, scene: SceneRecord, frame: torch.Tensor, cam: Cameras,
                 predicted: torch.Tensor) -> torch.Tensor:
    """Depth (H,W) of a generated frame for the cache: exact for procedural scenes, else the configured
    estimator scaled to ``predicted`` (the cache's warped depth there, 0 where unknown)."""
    d = config.depth
    if d.backend == "procedural":
        from lyra_ops.scenes import make_scene

        raw = make_scene(scene.seed, kind=config.scenes.scene_kind).render(cam.c2w, cam.K, cam.height,
                                                                          cam.width).depth[0, 0]
        return postprocess_depth(raw, raw > 0, d.max_depth)
    pred = depth_estimator(d).estimate(frame, cam.K[0])
    raw = torch.where(pred.valid, pred.depth, 0.0) if pred.valid is not None else pred.depth
    aligned = align_depth_scale(raw, predicted, predicted > 0)[0]
    return postprocess_depth(aligned, aligned > 0, d.max_depth)


def generate_long_path(store: RunStore, config: RunConfig, scene: SceneRecord, name: str, generator, key: str,
                       cams: Cameras, input_rgb: torch.Tensor, input_depth: torch.Tensor,
                       input_reliable: torch.Tensor, input_K: torch.Tensor) -> None:
    """Teacher frames of a long path, clip by clip into ``trajectories/<name>/teacher/rgb`` (see the module)."""
    sid, base = scene.scene_id, f"trajectories/{name}"
    n, clip = len(cams), config.video.num_frames
    starts = clip_starts(n, clip)
    h, w = cams.height, cams.width
    rel = f"{base}/teacher/rgb"
    group = store.scene_group(sid)
    done = 0
    if rel in store.list_arrays(sid) and group[rel].attrs.get("unit_key") == key:
        done = int(group[rel].attrs.get("clips_done", 0))
    if done == 0:  # a new array (any partial one of another key is replaced)
        store.write_array(sid, rel, np.zeros((n, 3, h, w), dtype=np.uint8), chunks=(1, 3, h, w),
                          attrs={"generator": generator.name, "unit_key": key, "clips_done": 0,
                                 "clip_starts": starts, "clip_frames": clip})
    arr = store.scene_group(sid)[rel]
    if done:
        log.info("%s/%s: resuming generation at clip %d of %d", sid, name, done + 1, len(starts))
    source = {"rgb": input_rgb, "depth": input_depth, "reliable": input_reliable, "K": input_K, "c2w": IDENTITY}
    for c in range(done, len(starts)):
        s = starts[c]
        sub = Cameras(cams.c2w[s : s + clip], cams.K[s : s + clip], h, w)
        if c == 0:
            mask = torch.from_numpy(store.read_array(sid, f"{base}/refine/mask"))[:clip]
            warped = to_signed(from_uint8(torch.from_numpy(store.read_array(sid, f"{base}/warp/rgb"))[:clip]))
            warped = torch.where(mask, warped, torch.full_like(warped, -1.0))
            first = input_rgb
        else:
            first = from_uint8(torch.from_numpy(arr[s]))
            # the previous clip's last frame joins the cache with its depth, scaled to what the cache predicts
            at = Cameras(cams.c2w[s : s + 1], cams.K[s : s + 1], h, w)
            _, predicted, known = _warp_source(source, at, config)
            depth = _frame_depth(config, scene, first, at, torch.where(known, predicted, 0.0)[0, 0])
            last = {"rgb": first, "depth": depth, "K": at.K[0], "c2w": at.c2w[0],
                    "reliable": depth_reliability_mask(depth, config.depth.edge_window, edge_threshold(config))}
            warped, mask = _cache_warp([source, last], sub, config)
        # one noise seed for every clip (the path's): a teacher that draws the same noise for a clip's frames then
        # draws it for the whole path, and the frames after a boundary do not change noise as well as conditioning
        frames = generator.generate(first, scene.text, sub, warped, mask, seed=derive_seed(scene.seed, "generate",
                                                                                             name))
        lo = 0 if c == 0 else 1  # a later clip's first frame is the previous clip's last one
        arr[s + lo : s + len(sub)] = to_uint8(frames[lo:]).numpy()
        arr.attrs["clips_done"] = c + 1  # after the frames: a kill never records a clip it did not write
