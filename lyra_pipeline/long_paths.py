"""Generating a path longer than the video model's clip, clip by clip (Lyra-2 / GEN3C's long-video generation).

A path of ``N`` frames is covered by clips of ``L = video.num_frames`` frames, each sharing at least ``k =
generator.clip_overlap`` frames with the clip before (the fewest such clips, starts spread evenly from 0 to
``N - L``). Each clip is conditioned on the 3D cache warped into its cameras, its first frame being the frame at its
start ``s_c`` generated before it, and the frames it shares are cross-faded from the earlier clip's to the new
clip's (weights 0, 1/m, ..., (m-1)/m over m shared frames): a teacher whose clips start sharp and blur as the
cache's coverage falls then changes gradually across a boundary instead of jumping. ``k = 1`` is plain chaining
(the shared frame is the conditioning frame).

- clip 0: the cache is the input frame with its depth: the stored ``warp`` / ``refine`` frames;
- clip ``c > 0``: the cache is the input frame and the previous clip's frame ``s_c``, with that frame's
  depth from the configured estimator, scaled to the depth the cache already predicts there (the median ratio
  to the warped depth; the exact depth for procedural scenes). Each source is warped into the clip's cameras and
  the sources' points are splatted together (``forward_warp_sources``: depth- and bilinear-weighted, as one
  frame's pixels are) and the mask refined against each source's seam mesh in turn.

Frames are written into ``teacher/rgb`` clip by clip; its attributes ``clips_done`` and ``unit_key`` make the
unit resumable per clip (a killed generation restarts at its first unfinished clip, under the same key only),
and ``clip_starts`` records where each clip began. ``teacher/tail`` keeps, in two alternating slots, the frames
each clip generated where the next one overlaps it, as generated: the cross-fade reads them there, so a clip
resumed after a kill fades from the same frames and ends identical.
"""

from __future__ import annotations

import logging
import math

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


def clip_starts(frames: int, clip: int, overlap: int = 1) -> list[int]:
    """First frame of every clip covering ``frames`` frames with ``clip``-frame clips, each sharing at least
    ``overlap`` frames with the one before: the fewest clips that can, spread evenly from frame 0 to the end."""
    if not 1 <= overlap < clip:
        raise ValueError(f"generator.clip_overlap: expected 1 <= overlap < {clip} (the clip length), got {overlap}")
    if frames <= clip:
        return [0]
    count = math.ceil((frames - overlap) / (clip - overlap))
    return [round(c * (frames - clip) / (count - 1)) for c in range(count)]


def crossfade_weights(shared: int) -> list[float]:
    """Weight of the new clip on each of the ``shared`` frames it shares with the clip before: 0 on the first
    (the frame the new clip is conditioned on, kept as it was), rising linearly, so the change between the two
    clips' frames is spread over the shared frames instead of falling on one."""
    return [j / shared for j in range(shared)]


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
    starts = clip_starts(n, clip, config.generator.clip_overlap)
    h, w = cams.height, cams.width
    rel = f"{base}/teacher/rgb"
    group = store.scene_group(sid)
    done = 0
    if rel in store.list_arrays(sid) and group[rel].attrs.get("unit_key") == key:
        done = int(group[rel].attrs.get("clips_done", 0))
    shared = [starts[c - 1] + clip - starts[c] for c in range(1, len(starts))]  # frames clip c shares, c >= 1
    tail_rel = f"{base}/teacher/tail"
    if done == 0:  # a new array (any partial one of another key is replaced)
        store.write_array(sid, rel, np.zeros((n, 3, h, w), dtype=np.uint8), chunks=(1, 3, h, w),
                          attrs={"generator": generator.name, "unit_key": key, "clips_done": 0,
                                 "clip_starts": starts, "clip_frames": clip})
        if shared:  # two slots: clip c reads the earlier clip's frames from one while it fills the other
            store.write_array(sid, tail_rel, np.zeros((2, max(shared), 3, h, w), dtype=np.uint8),
                              chunks=(1, 1, 3, h, w), attrs={"unit_key": key})
    arr = store.scene_group(sid)[rel]
    tail = store.scene_group(sid)[tail_rel] if shared else None
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
        out = to_uint8(frames).numpy()
        if c > 0:  # the shared frames cross-faded from the earlier clip's own frames (kept in its tail slot)
            k = shared[c - 1]
            old = torch.from_numpy(tail[(c - 1) % 2, :k]).float()
            weights = torch.tensor(crossfade_weights(k)).reshape(k, 1, 1, 1)
            out[:k] = (old + weights * (torch.from_numpy(out[:k]).float() - old)).round().to(torch.uint8).numpy()
        arr[s : s + len(sub)] = out
        if c + 1 < len(starts):  # this clip's frames the next one will share, as generated (before any fade)
            k = shared[c]
            tail[c % 2, :k] = to_uint8(frames[len(sub) - k :]).numpy()
        arr.attrs["clips_done"] = c + 1  # after the frames: a kill never records a clip it did not write
