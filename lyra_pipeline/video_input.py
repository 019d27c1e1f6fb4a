"""Monocular input videos for dynamic scenes: frames, per-frame cameras and timestamps, validated.

``lyra run --video FILE --poses FILE`` (dynamic scenes, issue 16) reads the video with imageio-ffmpeg (mp4, webm),
takes the clip's first ``frames`` frames (the last one repeated when the video is shorter, as Lyra does), and
resizes each to cover the video format and centre-crops it, like an input image. Poses come from a trajectory
file (``.npz``: ``w2c`` (N,4,4), ``intrinsics`` (N,3,3), optional ``image_height``/``image_width`` and
``times`` (N,); ``.json``: the custom-trajectory format with an optional ``time`` per frame), one per video
frame, with the same validation as custom trajectories (rigid poses, finite positive intrinsics); intrinsics
follow the same cover crop. Times (seconds or any unit) must increase strictly; they are normalised to [0, 1]
over the clip (0 = first frame, 1 = last). Every failure is one :class:`LyraInputError` line naming the file.

:func:`write_video` / :func:`write_video_poses` write the same formats (losslessly: H.264 RGB at qp 0), which is
how procedural dynamic scenes become input videos and how the round trip is tested.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lyra_ops.cameras import Cameras
from lyra_ops.errors import LyraInputError
from lyra_ops.images import cover_crop_resize, from_uint8, to_uint8
from lyra_ops.trajectories import load_trajectory

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv")


@dataclass(frozen=True)
class InputVideo:
    """A clip in the video format: frames (T,3,H,W) in [0,1], their cameras, normalised times (T,), the fps."""

    frames: torch.Tensor
    cameras: Cameras
    times: torch.Tensor
    fps: float
    source_frames: int  # frames the file holds (before sampling to the clip)


def _ffmpeg():
    try:
        import imageio_ffmpeg
    except ImportError:
        raise LyraInputError("video input needs imageio-ffmpeg: pip install 'lyra-pipeline[video]'") from None
    return imageio_ffmpeg


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Every frame of a video file as uint8 (N,H,W,3), and its frame rate."""
    path = Path(path)
    if not path.is_file():
        raise LyraInputError(f"{path}: no such video file")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise LyraInputError(f"{path}: unsupported video type {path.suffix!r}; expected one of {VIDEO_SUFFIXES}")
    ffmpeg = _ffmpeg()
    try:
        reader = ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(f, dtype=np.uint8).reshape(h, w, 3) for f in reader]
    except LyraInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - ffmpeg fails in many ways on a bad file
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise LyraInputError(f"{path}: cannot decode as a video ({reason[:200]}); expected an mp4 or webm "
                             "file") from None
    if not frames:
        raise LyraInputError(f"{path}: the video has no frames")
    return np.stack(frames), float(meta.get("fps") or 0.0)


def read_times(path: str | Path, count: int) -> torch.Tensor | None:
    """The poses file's per-frame times (npz key ``times``, JSON frame field ``time``), or None."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "times" not in data.files:
                return None
            times = np.asarray(data["times"], dtype=np.float64).reshape(-1)
    else:
        frames = json.loads(path.read_text(encoding="utf-8")).get("frames", [])
        given = ["time" in f for f in frames if isinstance(f, dict)]
        if not any(given):
            return None
        if not all(given):
            raise LyraInputError(f"{path}: 'time' is given for some frames but not all ({sum(given)} of "
                                 f"{len(given)}); give every frame a time or none")
        times = np.asarray([float(f["time"]) for f in frames], dtype=np.float64)
    if times.shape[0] != count:
        raise LyraInputError(f"{path}: {times.shape[0]} times for {count} poses; expected one per pose")
    if not np.isfinite(times).all():
        raise LyraInputError(f"{path}: times contain NaN or Inf")
    steps = np.diff(times)
    if (steps <= 0).any():
        i = int(np.nonzero(steps <= 0)[0][0]) + 1
        raise LyraInputError(f"{path}: times must increase strictly (frame {i}: {times[i]:g} after "
                             f"{times[i - 1]:g})")
    return torch.from_numpy(times)


def load_input_video(video: str | Path, poses: str | Path, *, height: int, width: int,
                     num_frames: int) -> InputVideo:
    """A video and its poses file as one clip of ``num_frames`` frames in the video format (see the module)."""
    raw, fps = read_video(video)
    n, src_h, src_w, _ = raw.shape
    if _names_size(poses):  # intrinsics for the size the file names: mapped by load_trajectory
        cams = load_trajectory(poses, height=height, width=width)
    else:  # intrinsics for the video's own frames: the cover crop that maps the frames maps them
        cams = _load_for_size(poses, src_h, src_w, height, width)
    if len(cams) != n:
        raise LyraInputError(f"{poses}: {len(cams)} poses but {video} has {n} frames; expected one pose per video "
                             "frame")
    times = read_times(poses, n)
    if times is None:
        times = torch.arange(n, dtype=torch.float64) / fps if fps > 0 else torch.arange(n, dtype=torch.float64)
    idx = torch.arange(num_frames).clamp_max(n - 1)  # Lyra: the first T frames, the last repeated if shorter
    t = times[idx]
    span = float(t[-1] - t[0])
    tau = (t - t[0]) / span if span > 0 else torch.linspace(0.0, 1.0, num_frames, dtype=torch.float64)
    frames = torch.stack([cover_crop_resize(from_uint8(torch.from_numpy(raw[i]).permute(2, 0, 1)), height, width)
                          for i in idx.tolist()])
    clip = Cameras(cams.c2w[idx], cams.K[idx], height, width)
    return InputVideo(frames, clip, tau, fps, n)


def _names_size(path: str | Path) -> bool:
    """Whether the poses file names the image size its intrinsics are for. The values are
    checked by ``load_trajectory``, which also names a file that does not parse (True sends it there)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return "image_height" in data.files and "image_width" in data.files
        doc = json.loads(path.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - unreadable: load_trajectory says what is wrong, in one line
        return True
    return isinstance(doc, dict) and "image_height" in doc and "image_width" in doc


def _load_for_size(path: str | Path, src_h: int, src_w: int, height: int, width: int) -> Cameras:
    """Poses whose intrinsics are for the video's own frame size (the file names none), mapped by the cover
    crop that maps the frames."""
    from lyra_ops.images import cover_crop_intrinsics

    cams = load_trajectory(path, height=src_h, width=src_w)
    return Cameras(cams.c2w, cover_crop_intrinsics(cams.K.double(), src_h, src_w, height, width).float(),
                   height, width)


def write_video(path: str | Path, frames: torch.Tensor, fps: float = 16.0) -> Path:
    """Frames (T,3,H,W) in [0,1] as a lossless H.264 RGB mp4 (qp 0: every pixel read back exactly)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_uint8(frames).permute(0, 2, 3, 1).contiguous().numpy()
    t, h, w, _ = data.shape
    writer = _ffmpeg().write_frames(str(path), (w, h), fps=fps, codec="libx264rgb", pix_fmt_in="rgb24",
                                    pix_fmt_out="rgb24", output_params=["-qp", "0", "-preset", "veryfast"],
                                    macro_block_size=1, quality=None)
    writer.send(None)
    for frame in data:
        writer.send(frame.tobytes())
    writer.close()
    return path


def write_video_poses(path: str | Path, cameras: Cameras, times: torch.Tensor) -> Path:
    """``.npz`` poses file for a video: w2c, intrinsics, image size and times (what :func:`load_input_video`
    reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, w2c=cameras.w2c.double().numpy(), intrinsics=cameras.K.double().numpy(),
             image_height=cameras.height, image_width=cameras.width, times=np.asarray(times, dtype=np.float64))
    return path
