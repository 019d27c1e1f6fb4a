"""lyra inspect for any stored array: statistics, image forms of every layout, PNG/GIF/MP4 export."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lyra_ops.errors import LyraStorageError
from lyra_pipeline.inspect import array_frames, array_info, export_frames
from lyra_pipeline.storage import RunStore


def test_array_info_and_frames_of_every_layout(smoke_store):
    store = RunStore(smoke_store)
    sid = store.scene_ids()[0]
    info = array_info(store, sid, "trajectories/left/teacher/rgb")
    teacher = store.read_array(sid, "trajectories/left/teacher/rgb")
    assert info["shape"] == teacher.shape and info["dtype"] == "uint8" and info["chunks"] == (1, 3, 96, 160)
    assert info["min"] == teacher.min() and info["max"] == teacher.max() and info["nonfinite"] == 0
    assert info["attrs"]["generator"] == "oracle"
    with pytest.raises(LyraStorageError, match="no array 'nope'.*teacher/rgb"):
        array_info(store, sid, "nope")
    frames = array_frames(teacher, "teacher/rgb")
    assert len(frames) == 9 and frames[3].shape == (96, 160, 3)
    np.testing.assert_array_equal(frames[3], np.moveaxis(teacher[3], 0, -1))
    # the patchify latents decode back to the teacher frames (within float16 rounding of [-1, 1] values)
    latents = array_frames(store.read_array(sid, "trajectories/left/latents"), "trajectories/left/latents")
    assert len(latents) == 9
    assert np.abs(np.stack(latents).astype(int) - np.moveaxis(teacher, 1, -1).astype(int)).max() <= 1
    mask = array_frames(store.read_array(sid, "trajectories/left/refine/mask"), "refine/mask")
    assert set(np.unique(mask[4])) <= {0, 255}
    depth = array_frames(store.read_array(sid, "trajectories/left/warp/depth"), "warp/depth")
    assert depth[4].std() > 0
    assert len(array_frames(store.read_array(sid, "depth/depth"), "depth/depth")) == 1
    with pytest.raises(ValueError, match="no image form"):
        array_frames(store.read_array(sid, "trajectories/left/cameras/c2w"), "cameras/c2w")


def test_export_png_gif_mp4(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (32, 48, 3), dtype=np.uint8) for _ in range(5)]
    export_frames(frames, tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").size == (5 * 48, 32)
    export_frames(frames, tmp_path / "a.gif")
    assert Image.open(tmp_path / "a.gif").n_frames == 5
    with pytest.raises(ValueError, match="unsupported"):
        export_frames(frames, tmp_path / "a.tiff")
    pytest.importorskip("imageio_ffmpeg")
    export_frames(frames, tmp_path / "a.mp4")
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(tmp_path / "a.mp4"))
    meta = next(reader)
    assert meta["size"] == (48, 32) and sum(1 for _ in reader) == 5


def _poses(centres: np.ndarray, yaws: np.ndarray | None = None) -> np.ndarray:
    c2w = np.tile(np.eye(4), (len(centres), 1, 1))
    c2w[:, :3, 3] = centres
    if yaws is not None:
        c2w[:, 0, 0], c2w[:, 0, 2], c2w[:, 2, 0], c2w[:, 2, 2] = np.cos(yaws), np.sin(yaws), -np.sin(yaws), np.cos(yaws)
    return c2w


def test_spread_frames_follow_where_the_camera_goes():
    from lyra_pipeline.inspect import evenly_spaced, spread_frames

    # two loops of a circle in 25 frames: frames 0, 12 and 24 are the same position
    a = np.linspace(0, 4 * np.pi, 25)
    loop = _poses(np.stack([np.cos(a) - 1, np.sin(a), np.zeros(25)], axis=1) * 0.3)
    assert evenly_spaced(25, 3) == [0, 12, 24]
    picks = spread_frames(loop, 3)
    centres = loop[picks, :3, 3]
    gaps = [np.linalg.norm(centres[i] - centres[j]) for i in range(3) for j in range(i + 1, 3)]
    assert picks[0] == 0 and min(gaps) > 0.3, picks  # at least half the loop's diameter (0.6) apart
    # turning in place still spreads; standing still falls back to even numbering
    turn = _poses(np.zeros((9, 3)), np.linspace(0, 0.8, 9))
    assert spread_frames(turn, 3) == [0, 4, 8]
    assert spread_frames(_poses(np.zeros((9, 3))), 3) == evenly_spaced(9, 3)
