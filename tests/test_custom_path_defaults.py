"""Custom paths as the user gave them (issue 28 item 6): ``--trajectory`` keeps every frame of the path by default
(``trajectories.frames: all``; ``clip`` is an option), the run says how many frames and clips it will generate and
roughly how long, and the cover crop maps the path's intrinsics with one scale and a fractional offset, so pixels
keep the file's aspect and a centred principal point stays centred."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch

from lyra_ops.images import cover_crop, cover_crop_intrinsics, cover_crop_transform
from lyra_ops.trajectories import load_trajectory


@pytest.fixture(scope="module")
def lyra2_path(examples_dir):
    return examples_dir / "custom_trajectory_examples" / "example_0" / "trajectory.npz"


def test_default_keeps_every_frame_of_a_500_frame_path(lyra2_path):
    """The planning of the Lyra-2 example: 500 frames (+5 holding the last pose, 8k+1) by default, 9 with clip."""
    from lyra_pipeline.config import build_config
    from lyra_pipeline.planning import trajectory_cameras

    config = build_config("smoke", {"trajectories": {"custom": str(lyra2_path)}})
    assert config.trajectories.frames == "all"
    cams, _ = trajectory_cameras(config, None, "custom", None)
    assert len(cams) == 505
    raw = np.load(lyra2_path)["w2c"].astype(np.float64)
    last = np.linalg.inv(raw[499])[:3, 3]
    expected = (raw[0] @ np.append(last, 1.0))[:3]  # the path's last centre, in frame 0's camera
    np.testing.assert_allclose(cams.centers[499].numpy(), expected, atol=1e-4)
    assert torch.equal(cams.c2w[504], cams.c2w[499])
    clip = build_config("smoke", {"trajectories": {"custom": str(lyra2_path), "frames": "clip"}})
    assert len(trajectory_cameras(clip, None, "custom", None)[0]) == 9


def test_the_plan_line_names_frames_clips_and_time(lyra2_path):
    from lyra_pipeline.config import build_config
    from lyra_pipeline.planning import custom_path_plan

    oracle = custom_path_plan(build_config("smoke", {"trajectories": {"custom": str(lyra2_path)}}))
    assert "all 500 frames" in oracle and "= 505" in oracle and "generated whole" in oracle and "roughly" in oracle
    tiny = custom_path_plan(build_config("smoke", {"trajectories": {"custom": str(lyra2_path)},
                                                   "generator": {"backend": "tiny"}}))
    assert "101 clips of 9 frames sharing 4" in tiny, tiny  # clip_starts(505, 9, 4)
    clip = custom_path_plan(build_config("smoke", {"trajectories": {"custom": str(lyra2_path), "frames": "clip"}}))
    assert "9 of its 500 frames" in clip


def test_dropping_frames_is_warned_keeping_them_is_not(tmp_path, lyra2_path, caplog):
    from lyra_pipeline import planning
    from lyra_pipeline.config import build_config

    planning._LOGGED_FRAME_CHOICES.clear()
    with caplog.at_level(logging.WARNING):
        planning.trajectory_cameras(build_config("smoke", {"trajectories": {"custom": str(lyra2_path)}}), None,
                                    "custom", None)
        assert "uses" not in caplog.text
        planning.trajectory_cameras(build_config("smoke", {"trajectories": {"custom": str(lyra2_path),
                                                                            "frames": "clip"}}), None, "custom", None)
    assert "uses 9 of its 500 frames" in caplog.text and "frames: all keeps every frame" in caplog.text


@pytest.mark.parametrize("size", [(96, 160), (176, 320), (352, 640), (480, 832), (704, 1280), (100, 100)])
def test_lyra2_intrinsics_keep_square_pixels_and_the_centre(lyra2_path, size):
    """Before: fx/fy 1.0021 at 96x160 (the file: 0.99987) and cx half a pixel off centre (80.5 for 80)."""
    h, w = size
    raw = np.load(lyra2_path)["intrinsics"][0].astype(np.float64)
    cams = load_trajectory(lyra2_path, height=h, width=w)
    k = cams.K[0].double()
    aspect = float(k[0, 0] / k[1, 1]) / (raw[0, 0] / raw[1, 1])
    assert abs(aspect - 1) < 1e-6, aspect  # the file's pixel aspect kept (square to 1e-4 asks less)
    assert abs(float(k[0, 0] / k[1, 1]) - 1) < 2e-4  # the file's own pixels are square to 1.3e-4
    assert float(k[0, 2]) == pytest.approx(w / 2, abs=1e-4) and float(k[1, 2]) == pytest.approx(h / 2, abs=1e-4)
    scale = max(h / 720, w / 1280)
    assert float(k[0, 0]) == pytest.approx(raw[0, 0] * scale, rel=1e-6)


@pytest.mark.parametrize("src, dst", [((720, 1280), (96, 160)), ((300, 200), (64, 96)), ((714, 1280), (176, 320))])
def test_a_dot_lands_where_the_mapped_intrinsics_project_it(src, dst):
    """A bright 2x2 block at a known source point, cover-cropped with the default (antialiased bicubic) resize:
    its intensity-weighted centre is where the cropped camera sees that point (the fractional crop offset is in
    the image as well as in K)."""
    (sh, sw), (h, w) = src, dst
    img = torch.zeros(1, sh, sw, dtype=torch.float64)
    y0, x0 = int(sh * 0.37), int(sw * 0.61)
    img[0, y0:y0 + 2, x0:x0 + 2] = 1.0
    out = cover_crop(img, h, w, mode="bicubic")[0]
    ii, jj = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                            indexing="ij")
    cy, cx = float((out * ii).sum() / out.sum()), float((out * jj).sum() / out.sum())
    K = torch.tensor([[500.0, 0, sw / 2], [0, 500.0, sh / 2], [0, 0, 1]], dtype=torch.float64)
    k2 = cover_crop_intrinsics(K, sh, sw, h, w)
    u = (x0 + 1 - K[0, 2]) / K[0, 0] * k2[0, 0] + k2[0, 2]  # the block's centre (x0 + 1, y0 + 1), reprojected
    v = (y0 + 1 - K[1, 2]) / K[1, 1] * k2[1, 1] + k2[1, 2]
    assert cx == pytest.approx(float(u), abs=0.02) and cy == pytest.approx(float(v), abs=0.02)
    scale, top, left = cover_crop_transform(sh, sw, h, w)
    assert float(k2[0, 2]) == pytest.approx(w / 2, abs=1e-9) and float(k2[1, 2]) == pytest.approx(h / 2, abs=1e-9)
    assert top >= 0 and left >= 0 and (top == 0 or left == 0)


def test_named_paths_keep_their_keys_under_the_new_default():
    """``frames`` only selects from a custom path: a run of Lyra's six paths has the cameras keys it had when
    ``clip`` was the default (its stores stay finished)."""
    from lyra_ops.prompts import SceneRecord
    from lyra_pipeline.config import build_config
    from lyra_pipeline.stages import plan_keys

    scene = SceneRecord("proc-000000", "a room", None, "0" * 64, 7, "procedural")
    now = plan_keys(build_config("smoke"), scene)
    old = plan_keys(build_config("smoke", {"trajectories": {"frames": "clip"}}), scene)
    assert now == old


@pytest.mark.slow
def test_a_500_frame_path_is_stored_whole_by_default(tmp_path, lyra2_path, torch_single_thread):
    """`lyra run --trajectory` on the Lyra-2 example at the smoke size stores 505 frames (500 + 5 holding the last
    pose) with square-pixel intrinsics; the run prints the plan line (about a minute on one CPU thread)."""
    from typer.testing import CliRunner

    from lyra_pipeline.cli import app
    from lyra_pipeline.storage import RunStore

    store = tmp_path / "store"
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["run", "--preset", "smoke", "--num-scenes", "1", "--trajectory", str(lyra2_path),
                                   "--store", str(store), "--workers", "1"])
    seconds = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    assert "all 500 frames" in res.output, res.output
    st = RunStore(store, create=False)
    (sid,) = st.scene_ids()
    K = st.read_array(sid, "trajectories/custom/cameras/K")
    assert K.shape[0] == 505 and st.read_array(sid, "trajectories/custom/teacher/rgb").shape[0] == 505
    raw = np.load(lyra2_path)["intrinsics"].astype(np.float64)
    raw = np.concatenate([raw, raw[-1:].repeat(5, axis=0)])  # the 5 frames holding the last pose
    aspect = (K[:, 0, 0] / K[:, 1, 1]) / (raw[:, 0, 0] / raw[:, 1, 1])
    assert np.abs(aspect - 1).max() < 1e-4  # the file's pixel aspect, every frame (its own: 1.3e-4 off square)
    assert np.abs(K[:, 0, 0] / K[:, 1, 1] - 1).max() < 2e-4
    assert np.allclose(K[:, 0, 2], 80.0, atol=1e-4) and np.allclose(K[:, 1, 2], 48.0, atol=1e-4)
    print(f"500-frame path stored in {seconds:.1f} s")
