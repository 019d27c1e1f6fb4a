"""What the SDG stages compute for dynamic scenes (``scenes.source: dynamic``; spec section 3).

The stage tasks of :mod:`tasks.sdg` call these for dynamic scenes; keys, manifest, leases and resume are the
static stages' own (:func:`lyra_pipeline.stages.run_units`). Differences from a static scene:

- ``input``: the input is a video: ``input/video/{rgb,c2w,times}`` (T frames, their cameras relative to frame 0,
  their normalised times); ``input/rgb`` and ``input/K`` hold frame 0, the conditioning image, as for a static
  scene.
- ``depth``: the depth of every input frame, ``depth/video/{depth,reliable}`` (and frame 0's as ``depth/depth``,
  ``depth/reliable``).
- ``cameras``: a path is ``M_t w2c_in_t`` at the input's time ``tau_t`` (``cameras/times``), warped from input frame
  ``cameras/source_frames[t]`` (the frame at the same time); ``<path>_flip`` is the flipped twin.
- ``warp`` / ``refine``: target frame ``t`` is warped from input frame ``t`` alone, with that frame's depth and
  pose (time-synchronised warping), and its mask refined against that frame's seam mesh.
- ``generate``: the oracle renders the moving scene at each frame's camera and time; another teacher generates
  in generation order (a flipped path from the last input frame backwards) and its frames are stored back in time
  order.
- ``video_depth``: exact depth of the moving scene at each frame's camera and time (procedural depth).
"""

from __future__ import annotations

import numpy as np
import torch

from lyra_ops.cameras import Cameras
from lyra_ops.depth import postprocess_depth
from lyra_ops.dynamic import DynamicPath, generation_index
from lyra_ops.images import from_signed, from_uint8, to_signed, to_uint8
from lyra_ops.mask_refine import refine_mask_conservative
from lyra_ops.prompts import SceneRecord
from lyra_ops.seeding import derive_seed
from lyra_ops.warp import WarpResult, depth_reliability_mask, forward_warp, unproject_depth
from lyra_pipeline.backends import depth_estimator
from lyra_pipeline.config import RunConfig, edge_threshold, mesh_downsample
from lyra_pipeline.planning import dynamic_input, dynamic_trajectory, dynamic_world
from lyra_pipeline.storage import RunStore


def _read(store: RunStore, scene_id: str, name: str) -> torch.Tensor:
    return torch.from_numpy(store.read_array(scene_id, name))


def _frames(store: RunStore, scene_id: str, name: str, data: np.ndarray, **attrs) -> None:
    store.write_array(scene_id, name, data, chunks=(1, *data.shape[1:]), attrs=attrs or None)


def input_cameras(store: RunStore, scene_id: str, config: RunConfig) -> Cameras:
    """The stored input video's cameras (frame 0 at the identity)."""
    v = config.video
    return Cameras(_read(store, scene_id, "input/video/c2w"), _read(store, scene_id, "input/video/K"), v.height,
                   v.width)


def input_frames(store: RunStore, scene_id: str) -> torch.Tensor:
    """The stored input video's frames (T,3,H,W) in [0,1]."""
    return from_uint8(_read(store, scene_id, "input/video/rgb"))


def read_path(store: RunStore, scene_id: str, name: str, config: RunConfig) -> DynamicPath:
    base = f"trajectories/{name}/cameras"
    cams = Cameras(_read(store, scene_id, f"{base}/c2w"), _read(store, scene_id, f"{base}/K"), config.video.height,
                   config.video.width)
    flipped = bool(store.scene_group(scene_id)[f"{base}/c2w"].attrs.get("flipped", False))
    return DynamicPath(name, cams, _read(store, scene_id, f"{base}/times"), flipped,
                       _read(store, scene_id, f"{base}/source_frames"))


def make_input(store: RunStore, config: RunConfig, scene: SceneRecord) -> None:
    frames, cams, times = dynamic_input(config, scene)
    sid = scene.scene_id
    store.scene_group(sid).attrs.update(scene.as_row())
    store.write_array(sid, "input/rgb", to_uint8(frames[0]).numpy())
    store.write_array(sid, "input/K", cams.K[0].numpy())
    _frames(store, sid, "input/video/rgb", to_uint8(frames).numpy())
    store.write_array(sid, "input/video/c2w", cams.c2w.numpy())
    store.write_array(sid, "input/video/K", cams.K.numpy())
    store.write_array(sid, "input/video/times", times.numpy())


def estimate_depth(store: RunStore, config: RunConfig, scene: SceneRecord) -> None:
    sid, d = scene.scene_id, config.depth
    cams = input_cameras(store, sid, config)
    if d.backend == "procedural":
        times = _read(store, sid, "input/video/times")
        raw = dynamic_world(config, scene).render(cams.c2w, cams.K, cams.height, cams.width, times).depth[:, 0]
        valid, label = raw > 0, "procedural (exact, per frame)"
    else:
        estimator = depth_estimator(d)
        frames = input_frames(store, sid)
        preds = [estimator.estimate(frames[i], cams.K[i]) for i in range(len(cams))]
        raw, label = torch.stack([p.depth for p in preds]), preds[0].label
        valid = torch.stack([p.valid for p in preds]) if preds[0].valid is not None else None
    depth = torch.stack([postprocess_depth(raw[i], valid[i] if valid is not None else None, d.max_depth)
                         for i in range(raw.shape[0])])
    reliable = torch.stack([depth_reliability_mask(z, d.edge_window, edge_threshold(config)) for z in depth])
    store.write_array(sid, "depth/depth", depth[0].numpy(), attrs={"label": label})
    store.write_array(sid, "depth/reliable", reliable[0].numpy())
    _frames(store, sid, "depth/video/depth", depth[:, None].numpy(), label=label)
    _frames(store, sid, "depth/video/reliable", reliable[:, None].numpy())


def make_cameras(store: RunStore, config: RunConfig, scene: SceneRecord, name: str) -> None:
    sid = scene.scene_id
    path, distance = dynamic_trajectory(config, scene, name, input_cameras(store, sid, config))
    base = f"trajectories/{name}/cameras"
    store.write_array(sid, f"{base}/c2w", path.cameras.c2w.numpy(), attrs={"distance": distance,
                                                                            "flipped": path.flipped})
    store.write_array(sid, f"{base}/K", path.cameras.K.numpy())
    store.write_array(sid, f"{base}/times", path.times.numpy())
    store.write_array(sid, f"{base}/source_frames", path.source_frames.numpy())


def warp_frames(store: RunStore, config: RunConfig, scene: SceneRecord, name: str) -> None:
    """Each target frame from the input frame at the same time, with that frame's depth and pose."""
    sid = scene.scene_id
    frames, cams = input_frames(store, sid), input_cameras(store, sid, config)
    depth = _read(store, sid, "depth/video/depth")[:, 0]
    reliable = _read(store, sid, "depth/video/reliable")[:, 0]
    path = read_path(store, sid, name, config)
    w2c = path.cameras.w2c
    rgb, dep, mask = [], [], []
    for t, s in enumerate(path.source_frames.tolist()):
        warp = forward_warp(to_signed(frames[s]), depth[s], cams.K[s], cams.c2w[s], path.cameras.K[t : t + 1],
                            w2c[t : t + 1], source_mask=reliable[s], depth_weight_scale=config.warp.depth_weight_scale)
        rgb.append(warp.rgb)
        dep.append(warp.depth)
        mask.append(warp.mask)
    base = f"trajectories/{name}/warp"
    _frames(store, sid, f"{base}/rgb", to_uint8(from_signed(torch.cat(rgb))).numpy())
    _frames(store, sid, f"{base}/depth", torch.cat(dep).numpy())
    _frames(store, sid, f"{base}/mask", torch.cat(mask).numpy())


def refine_masks(store: RunStore, config: RunConfig, scene: SceneRecord, name: str) -> None:
    """Conservative masks per frame, each against the seam mesh of its own source frame."""
    sid = scene.scene_id
    base = f"trajectories/{name}/warp"
    mask = _read(store, sid, f"{base}/mask")
    if config.mask.refine:
        cams = input_cameras(store, sid, config)
        depth = _read(store, sid, "depth/video/depth")[:, 0]
        reliable = _read(store, sid, "depth/video/reliable")[:, 0]
        rgb = to_signed(from_uint8(_read(store, sid, f"{base}/rgb")))
        wdepth = _read(store, sid, f"{base}/depth")
        path = read_path(store, sid, name, config)
        w2c = path.cameras.w2c
        out = []
        for t, s in enumerate(path.source_frames.tolist()):
            points = unproject_depth(depth[s], cams.K[s], cams.c2w[s])
            warp = WarpResult(rgb[t : t + 1], wdepth[t : t + 1], mask[t : t + 1])
            out.append(refine_mask_conservative(warp, points, ~reliable[s], w2c[t : t + 1], path.cameras.K[t : t + 1],
                                                threshold=config.mask.threshold,
                                                factor=mesh_downsample(config)).mask)
        mask = torch.cat(out)
    _frames(store, sid, f"trajectories/{name}/refine/mask", mask.numpy())


def generate_video(store: RunStore, config: RunConfig, scene: SceneRecord, name: str, generator) -> None:
    sid, base = scene.scene_id, f"trajectories/{name}"
    path = read_path(store, sid, name, config)
    if config.generator.backend == "oracle":  # exact: the moving scene at each frame's camera and time
        cams = path.cameras
        frames = dynamic_world(config, scene).render(cams.c2w, cams.K, cams.height, cams.width, path.times).rgb
        label = "oracle"
    else:  # in generation order (a flipped path backwards in time), stored back in time order
        inputs = input_frames(store, sid)
        mask = _read(store, sid, f"{base}/refine/mask")
        warped = to_signed(from_uint8(_read(store, sid, f"{base}/warp/rgb")))
        warped = torch.where(mask, warped, torch.full_like(warped, -1.0))
        order = generation_index(path)
        frames = generator.generate(inputs[int(path.source_frames[order[0]])], scene.text, path.cameras[order],
                                    warped[order], mask[order], seed=derive_seed(scene.seed, "generate", name))
        frames = frames[torch.argsort(order)]  # back to time order
        label = generator.name
    _frames(store, sid, f"{base}/teacher/rgb", to_uint8(frames).numpy(), generator=label)


def video_depth(store: RunStore, config: RunConfig, scene: SceneRecord, name: str) -> tuple[torch.Tensor, str]:
    """Depth of the teacher frames: exact for procedural depth, else the warped input depth on the mask."""
    sid = scene.scene_id
    if config.depth.backend == "procedural":
        path = read_path(store, sid, name, config)
        cams = path.cameras
        depth = dynamic_world(config, scene).render(cams.c2w, cams.K, cams.height, cams.width, path.times).depth
        return depth.float(), "procedural (exact, at each frame's time)"
    warped = _read(store, sid, f"trajectories/{name}/warp/depth").float()
    valid = _read(store, sid, f"trajectories/{name}/refine/mask").bool() & (warped > 0)
    return torch.where(valid, warped, 0.0), "warped input depth (refined mask; elsewhere unknown)"
