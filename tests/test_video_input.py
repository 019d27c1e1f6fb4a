"""Monocular video input (lyra_pipeline.video_input): a procedural dynamic scene written as a video with its poses
reads back to the same frames, cameras and times; bad inputs give one clear line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lyra_ops.cameras import default_intrinsics
from lyra_ops.dynamic import frame_times, input_camera_path, make_dynamic_scene
from lyra_ops.errors import LyraInputError
from lyra_ops.images import from_uint8, to_uint8

pytest.importorskip("imageio_ffmpeg")

from lyra_pipeline.video_input import load_input_video, write_video, write_video_poses  # noqa: E402

H, W, T = 32, 48, 9


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video")
    scene = make_dynamic_scene(4)
    cams = input_camera_path(4, default_intrinsics(H, W), H, W, T)
    frames = scene.render(cams.c2w, cams.K, H, W, frame_times(T)).rgb
    video = write_video(folder / "clip.mp4", frames, fps=8)
    poses = write_video_poses(folder / "clip.npz", cams, torch.arange(T) / 8.0)
    return folder, video, poses, frames, cams


def test_round_trip_gives_the_same_frames_cameras_and_times(clip):
    _, video, poses, frames, cams = clip
    got = load_input_video(video, poses, height=H, width=W, num_frames=T)
    assert torch.equal(to_uint8(got.frames), to_uint8(frames))  # lossless video
    torch.testing.assert_close(got.cameras.c2w, cams.c2w, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.cameras.K, cams.K, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.times, frame_times(T))
    assert got.fps == 8 and got.source_frames == T
    # a longer clip than the video repeats the last frame (and camera), as Lyra does
    longer = load_input_video(video, poses, height=H, width=W, num_frames=T + 8)
    assert torch.equal(longer.frames[-1], longer.frames[T - 1]) and longer.frames.shape[0] == T + 8
    # another video format: frames cover-cropped, intrinsics mapped alike
    small = load_input_video(video, poses, height=16, width=16, num_frames=T)
    assert small.frames.shape[-2:] == (16, 16) and small.cameras.K[0, 0, 2] == pytest.approx(8.0)


def test_bad_inputs_give_one_clear_line(clip, tmp_path):
    folder, video, poses, frames, cams = clip
    cases = []
    # frame-count mismatch
    short = write_video_poses(tmp_path / "short.npz", cams[: T - 2], torch.arange(T - 2) / 8.0)
    cases.append((video, short, f"{T - 2} poses but .* has {T} frames"))
    # non-monotonic timestamps
    times = torch.arange(T) / 8.0
    times[4] = times[2]
    cases.append((video, write_video_poses(tmp_path / "back.npz", cams, times), r"times must increase strictly "
                  r"\(frame 4"))
    # an undecodable file
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 100)
    cases.append((junk, poses, "cannot decode as a video"))
    # poses that are not rigid
    doc = {"frames": [{"c2w": (np.eye(4) * (2.0 if i == 3 else 1.0)).tolist(), "fx": 30, "fy": 30, "cx": 24,
                       "cy": 16} for i in range(T)]}
    doc["frames"][3]["c2w"][3][3] = 1.0
    bad = tmp_path / "scaled.json"
    bad.write_text(json.dumps(doc))
    cases.append((video, bad, r"frames\[3\]"))
    # some frames with a time, some without
    doc = {"frames": [{"c2w": np.eye(4).tolist(), "fx": 30, "fy": 30, "cx": 24, "cy": 16,
                       **({"time": i} if i < 4 else {})} for i in range(T)]}
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(doc))
    cases.append((video, partial, "'time' is given for some frames but not all"))
    # a size field that is not a number (before: ValueError traceback from int("tall"))
    doc = {"image_height": "tall", "image_width": W, "frames": [{"c2w": np.eye(4).tolist(), "fx": 30, "fy": 30,
                                                                  "cx": 24, "cy": 16} for _ in range(T)]}
    tall = tmp_path / "tall.json"
    tall.write_text(json.dumps(doc))
    cases.append((video, tall, "image_height"))
    cases.append((tmp_path / "missing.mp4", poses, "no such video file"))
    cases.append((poses, poses, "unsupported video type"))
    for v, p, message in cases:
        with pytest.raises(LyraInputError, match=message) as err:
            load_input_video(v, p, height=H, width=W, num_frames=T)
        assert "\n" not in str(err.value)
    assert from_uint8(to_uint8(frames)).shape == frames.shape
