"""Custom camera paths with their own intrinsics (issue 15 section 1): the input frame and the path share one
camera, mapped to the video size like an image is (one uniform scale and a centre-crop offset)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lyra_ops.images import cover_crop, cover_crop_intrinsics
from lyra_ops.trajectories import load_trajectory


def foreign_path(path, frames: int = 9, src_h: int = 720, src_w: int = 1280):
    """A Lyra-2-like JSON path: intrinsics for 720x1280 with a focal and principal point unlike ours, frame 0
    the identity, then a small move right."""
    out = []
    for i in range(frames):
        c2w = np.eye(4)
        c2w[0, 3] = 0.02 * i
        out.append({"c2w": c2w.tolist(), "fx": 1105.0, "fy": 1105.0, "cx": 610.0, "cy": 372.0})
    path.write_text(json.dumps({"image_height": src_h, "image_width": src_w, "frames": out}))
    return path


@pytest.mark.parametrize("src, dst", [((720, 1280), (96, 160)), ((720, 1280), (176, 320)), ((480, 640), (96, 160)),
                                      ((300, 200), (64, 96))])  # fmt: skip
def test_cover_crop_intrinsics_follow_the_image(src, dst):
    """A ramp image whose value is its continuous x (or y) coordinate, cover-cropped, holds at each pixel centre
    the source coordinate that the mapped intrinsics send there: u_src = (u_dst - cx') / fx' * fx + cx."""
    (sh, sw), (h, w) = src, dst
    u = (torch.arange(sw, dtype=torch.float64) + 0.5)[None, None, :].expand(1, sh, sw)
    v = (torch.arange(sh, dtype=torch.float64) + 0.5)[None, :, None].expand(1, sh, sw)
    ramp = torch.cat([u, v]).clone()
    # bilinear without antialiasing keeps a ramp exactly linear (cover_crop's own resampling, minus the smoothing)
    crop = cover_crop(ramp, h, w, mode="bilinear", antialias=False)
    assert crop.shape == cover_crop(ramp, h, w, mode="bilinear").shape == (2, h, w)
    K = torch.tensor([[900.0, 0, 0.45 * sw], [0, 880.0, 0.55 * sh], [0, 0, 1]], dtype=torch.float64)
    k2 = cover_crop_intrinsics(K, sh, sw, h, w)
    jj, ii = torch.meshgrid(torch.arange(w, dtype=torch.float64) + 0.5, torch.arange(h, dtype=torch.float64) + 0.5,
                            indexing="xy")
    expect_u = (jj - k2[0, 2]) / k2[0, 0] * K[0, 0] + K[0, 2]
    expect_v = (ii - k2[1, 2]) / k2[1, 1] * K[1, 1] + K[1, 2]
    inner = (slice(2, -2), slice(2, -2))  # the border clamps
    assert torch.allclose(crop[0][inner], expect_u[inner], atol=1e-6)
    assert torch.allclose(crop[1][inner], expect_v[inner], atol=1e-6)
    assert float(k2[0, 0] / k2[1, 1]) == pytest.approx(900 / 880, rel=1e-12)  # one scale: the pixel aspect is kept


def test_loaded_path_keeps_square_pixels(tmp_path):
    cams = load_trajectory(foreign_path(tmp_path / "p.json"), height=96, width=160)
    k = cams.K[0]
    assert float(k[0, 0]) == pytest.approx(float(k[1, 1]), rel=0.02)  # was 1105*160/1280 vs 1105*96/720: 9% apart


def test_identity_first_pose_gives_the_input_at_frame_0(tmp_path):
    """With the oracle teacher, frame 0 of a foreign-intrinsics path equals the input frame, and the input warped
    to frame 0 equals the input on >= 99% of the pixels the warp carries (before: ~2/3 valid, inside a black
    border)."""
    from lyra_pipeline.config import build_config
    from lyra_pipeline.storage import RunStore
    from tasks.sdg import SCENE_TASKS, sample_prompts

    path = foreign_path(tmp_path / "path.json")
    config = build_config("smoke", {"scenes": {"num_scenes": 1}, "trajectories": {"custom": str(path)}})
    store = tmp_path / "store"
    (scene,) = sample_prompts.fn(str(store), config)
    for task in SCENE_TASKS.values():
        task.fn(str(store), config, scene, "test")
    st = RunStore(store, create=False)
    sid = scene.scene_id
    rgb = st.read_array(sid, "input/rgb")
    k_in = st.read_array(sid, "input/K")
    k_path = st.read_array(sid, "trajectories/custom/cameras/K")
    np.testing.assert_array_equal(k_in, k_path[0])
    teacher0 = st.read_array(sid, "trajectories/custom/teacher/rgb")[0]
    np.testing.assert_array_equal(teacher0, rgb)
    warp0 = st.read_array(sid, "trajectories/custom/warp/rgb")[0].astype(int)
    mask0 = st.read_array(sid, "trajectories/custom/warp/mask")[0, 0]
    # The warp carries only pixels with reliable depth (Lyra's depth-edge filter, ~7% of a smoke frame); of those,
    # frame 0 must hold >= 99% unchanged, and it must lose none to a border.
    reliable = st.read_array(sid, "depth/reliable")
    same = mask0 & (np.abs(warp0 - rgb.astype(int)).max(axis=0) <= 1)
    assert same[reliable].mean() >= 0.99, same[reliable].mean()
    assert (mask0 == reliable).mean() >= 0.99
    assert reliable.mean() > 0.85


# --- long paths (issue 15 section 2) ---------------------------------------------------------------------------


def test_select_frames_modes():
    from lyra_ops.errors import LyraInputError
    from lyra_ops.trajectories import select_frames

    assert select_frames(500, "clip", 9) == (list(range(9)), 0)
    picks, held = select_frames(500, "all", 9)
    assert picks[:500] == list(range(500)) and held == 5 and len(picks) == 505 and set(picks[500:]) == {499}
    picks, held = select_frames(500, 25, 9)
    assert held == 0 and picks[0] == 0 and picks[-1] == 499 and len(picks) == 25
    assert max(b - a for a, b in zip(picks, picks[1:], strict=False)) - min(
        b - a for a, b in zip(picks, picks[1:], strict=False)) <= 1  # evenly spaced
    picks, held = select_frames(100, "stride 10", 9)
    assert picks[:11] == [*range(0, 100, 10), 99] and (len(picks) - 1) % 8 == 0
    for bad in ("every 2", 1, "stride 0", "some"):
        with pytest.raises(LyraInputError, match="trajectories.frames"):
            select_frames(100, bad, 9)
    with pytest.raises(LyraInputError, match="has 5 frames but 9"):
        select_frames(5, "clip", 9)


def test_long_path_oracle_frames_are_exact_and_the_drop_is_logged(tmp_path, caplog):
    """A 30-frame path with trajectories.frames: all is generated whole (33 frames: 3 hold the last pose); with
    the oracle teacher every frame equals the exact render. trajectories.frames: clip logs that it drops frames."""
    import logging

    from lyra_ops.images import to_uint8
    from lyra_ops.scenes import make_scene
    from lyra_pipeline.config import build_config
    from lyra_pipeline.planning import trajectory_cameras
    from lyra_pipeline.storage import RunStore
    from tasks.sdg import SCENE_TASKS, sample_prompts

    path = foreign_path(tmp_path / "long.json", frames=30)
    with caplog.at_level(logging.WARNING):
        trajectory_cameras(build_config("smoke", {"trajectories": {"custom": str(path), "frames": "clip"}}), None,
                           "custom", None)
    assert "uses 9 of its 30 frames" in caplog.text
    config = build_config("smoke", {"scenes": {"num_scenes": 1},
                                    "trajectories": {"custom": str(path), "frames": "all"}})
    store = tmp_path / "store"
    (scene,) = sample_prompts.fn(str(store), config)
    for task in SCENE_TASKS.values():
        task.fn(str(store), config, scene, "test")
    st = RunStore(store, create=False)
    c2w = torch.from_numpy(st.read_array(scene.scene_id, "trajectories/custom/cameras/c2w"))
    K = torch.from_numpy(st.read_array(scene.scene_id, "trajectories/custom/cameras/K"))
    assert c2w.shape[0] == 33 and torch.equal(c2w[29], c2w[32])
    teacher = st.read_array(scene.scene_id, "trajectories/custom/teacher/rgb")
    exact = to_uint8(make_scene(scene.seed).render(c2w, K, 96, 160).rgb).numpy()
    np.testing.assert_array_equal(teacher, exact)
    assert st.read_array(scene.scene_id, "trajectories/custom/latents").shape[1] == 5  # (33 - 1) / 8 + 1


def test_clip_starts_cover_the_path_with_one_frame_overlap():
    from lyra_pipeline.long_paths import clip_starts

    assert clip_starts(9, 9) == [0] and clip_starts(25, 9) == [0, 8, 16] and clip_starts(33, 25) == [0, 8]
    assert clip_starts(505, 9)[-1] == 496 and len(clip_starts(505, 9)) == 63


def test_long_path_with_the_tiny_teacher_is_generated_clip_by_clip_and_resumes_per_clip(tmp_path, monkeypatch):
    """25 frames in 9-frame clips sharing 4 frames (starts 0, 4, 8, 12, 16; the shared frames cross-faded): every
    frame generated; the change across a clip boundary is no larger than between neighbouring frames inside a clip
    (mean absolute difference of consecutive frames: the largest step into a clip's first own frame against the
    largest elsewhere, and the mean over every step of the cross-fades against the mean of the others); a
    generation killed after two clips resumes at the third and ends with the same frames."""
    import shutil
    from pathlib import Path

    from lyra_pipeline import long_paths
    from lyra_pipeline.config import build_config
    from lyra_pipeline.storage import RunStore
    from tasks.sdg import SCENE_TASKS, sample_prompts

    path = foreign_path(tmp_path / "long.json", frames=25)
    config = build_config("smoke", {"scenes": {"num_scenes": 1}, "generator": {"backend": "tiny", "steps": 2},
                                    "trajectories": {"custom": str(path), "frames": "all"}})
    store = tmp_path / "store"
    (scene,) = sample_prompts.fn(str(store), config)
    for name, task in SCENE_TASKS.items():
        if name in ("generate", "latents", "video_depth"):
            break
        task.fn(str(store), config, scene, "test")
    other = Path(shutil.copytree(store, tmp_path / "other"))
    for name in ("generate", "latents", "video_depth"):
        SCENE_TASKS[name].fn(str(other), config, scene, "test")
    st = RunStore(other, create=False)
    arr = st.scene_group(scene.scene_id)["trajectories/custom/teacher/rgb"]
    starts = [0, 4, 8, 12, 16]
    assert arr.shape == (25, 3, 96, 160) and arr.attrs["clip_starts"] == starts and arr.attrs["clips_done"] == 5
    frames = torch.from_numpy(arr[:]).float()
    steps = (frames[1:] - frames[:-1]).abs().mean(dim=(1, 2, 3))  # change from frame i to i + 1
    boundary = steps[starts[1:]]  # frame s -> s + 1: into the first frame each new clip generates
    inside = steps[[i for i in range(24) if i not in starts[1:]]]
    assert float(boundary.max()) <= float(inside.max()), (boundary, inside)
    # the frames the next clip fades from, kept as generated, as storage_layout.md documents them (K = 5 shared)
    tail = st.scene_group(scene.scene_id)["trajectories/custom/teacher/tail"]
    row = next(line for line in (Path(__file__).resolve().parents[1] / "storage_layout.md").read_text().splitlines()
               if line.startswith("| `trajectories/<trajectory>/teacher/tail`"))
    shape, dtype, chunks = (c.strip().strip("`") for c in row.strip("|").split("|")[1:4])
    sym = {"K": 5, "H": 96, "W": 160}
    assert tail.shape == eval(shape, {}, sym) and str(tail.dtype) == dtype  # noqa: S307
    assert tail.chunks == eval(chunks, {}, sym)  # noqa: S307
    fade = sorted({i for s, e in zip(starts[1:], [a + 9 for a in starts[:-1]], strict=True) for i in range(s, e)})
    rest = [i for i in range(24) if i not in fade]
    if rest:
        assert float(steps[fade].mean()) <= float(steps[rest].mean()) * 1.05, (steps[fade], steps[rest])
    assert st.read_array(scene.scene_id, "trajectories/custom/latents").shape[1] == 4  # (25 - 1) / 8 + 1

    # killed after two clips: the third raises once; the re-run resumes there and matches the straight run
    real = long_paths.forward_warp_sources
    calls = {"n": 0}

    def fail_in_clip_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the cache warp of clip 3 (clip 2 made the first)
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(long_paths, "forward_warp_sources", fail_in_clip_3)
    with pytest.raises(RuntimeError, match="killed"):
        SCENE_TASKS["generate"].fn(str(store), config, scene, "test")
    assert RunStore(store, create=False).scene_group(scene.scene_id)[
        "trajectories/custom/teacher/rgb"].attrs["clips_done"] == 2
    monkeypatch.setattr(long_paths, "forward_warp_sources", real)
    SCENE_TASKS["generate"].fn(str(store), config, scene, "test")
    resumed = RunStore(store, create=False).read_array(scene.scene_id, "trajectories/custom/teacher/rgb")
    np.testing.assert_array_equal(resumed, arr[:])


def test_lyra_compat_config_uses_the_reference_mask_settings_at_any_size():
    """configs/lyra_compat.yaml reproduces the reference's masks at every resolution: edge threshold 0.05 unscaled
    and a seam mesh at a quarter of the frame (the project's defaults scale both with the height)."""
    from pathlib import Path

    from lyra_pipeline.config import build_config, edge_threshold, load_config_file, mesh_downsample

    preset, over = load_config_file(Path(__file__).resolve().parents[1] / "configs" / "lyra_compat.yaml")
    for size in ({"height": 96, "width": 160}, {"height": 176, "width": 320}, {"height": 704, "width": 1280}):
        cfg = build_config(preset, {**over, "video": {**over.get("video", {}), **size}})
        assert edge_threshold(cfg) == 0.05 and mesh_downsample(cfg) == 4
        ours = build_config("default", {"video": size})
        assert edge_threshold(ours) == pytest.approx(0.05 * 704 / size["height"])
        assert mesh_downsample(ours) == max(1, size["height"] // 176)
