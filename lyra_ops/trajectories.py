"""Camera trajectories: Lyra's six multi-trajectory paths and custom paths loaded from files.

Paths follow the parametrisation of Lyra-1's ``camera_utils.py`` (spec section 1.5): linear moves whose
offset at frame i is ``i * d * c / n * sign`` along one axis, and a two-loop spiral, all looking at
``(0, 0, c)``. Two deliberate differences, both switchable for exact Lyra compatibility:

* ``lookat="textbook"`` (default) builds w2c = [R | -R p], so the camera really sits at p. Lyra sets the
  translation to -p (``lookat="lyra"``), which bends every path into an arc (spec section 8, item 7).
* Movement distances are drawn from a generator seeded per (scene, trajectory), never before seeding.
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path

import numpy as np
import torch

from lyra_ops.cameras import OPENCV_TO_OPENGL, Cameras, check_se3, intrinsics_matrix, invert_se3
from lyra_ops.errors import LyraInputError
from lyra_ops.images import cover_crop_intrinsics
from lyra_ops.paths import ALL_PATHS, EXTRA_PATHS, LYRA_PATHS, PathSpec  # noqa: F401 - re-exported

SPIRAL_RADIUS_X = 0.15
SPIRAL_RADIUS_Y = 0.10
SPIRAL_CIRCLES = 2


def look_at_w2c(position: torch.Tensor, target: torch.Tensor, *, lookat: str = "textbook") -> torch.Tensor:
    """World-to-camera (N,4,4) for cameras at ``position`` (N,3) looking at ``target`` (N,3), world y down.

    Rows of R are (right, up', forward) with forward = normalize(target - p), right = normalize(y x forward)
    and up' = forward x right, exactly as Lyra. ``lookat="lyra"`` reproduces Lyra's translation quirk (-p).
    """
    forward = target - position
    forward = forward / forward.norm(dim=-1, keepdim=True)
    world_y = torch.tensor([0.0, 1.0, 0.0], dtype=position.dtype).expand_as(forward)
    right = torch.linalg.cross(world_y, forward, dim=-1)
    right = right / right.norm(dim=-1, keepdim=True)
    up = torch.linalg.cross(forward, right, dim=-1)
    rot = torch.stack([right, up, forward], dim=-2)
    w2c = torch.eye(4, dtype=position.dtype).repeat(position.shape[0], 1, 1)
    w2c[:, :3, :3] = rot
    if lookat == "lyra":
        w2c[:, :3, 3] = -position
    elif lookat == "textbook":
        w2c[:, :3, 3] = -(rot @ position[..., None])[..., 0]
    else:
        raise LyraInputError(f"lookat must be 'textbook' or 'lyra', got {lookat!r}")
    return w2c


def path_positions(spec: PathSpec, num_frames: int, distance: float, center_depth: float) -> torch.Tensor:
    """Camera positions (n,3) of one path before the look-at rotation (spec section 1.5 formulas)."""
    n = num_frames
    i = torch.arange(n, dtype=torch.float64)
    pos = torch.zeros(n, 3, dtype=torch.float64)
    if spec.kind == "linear":
        pos[:, spec.axis] = i * distance * center_depth / n * spec.sign
    elif spec.kind == "spiral":
        theta = 2 * math.pi * SPIRAL_CIRCLES * i / max(n - 1, 1)
        rx, ry = distance * SPIRAL_RADIUS_X, distance * SPIRAL_RADIUS_Y
        pos[:, 0] = rx * (torch.cos(theta) - 1.0) * spec.sign * center_depth
        pos[:, 1] = ry * torch.sin(theta) * center_depth
    else:
        raise LyraInputError(f"unknown path kind {spec.kind!r} (expected 'linear' or 'spiral')")
    return pos


def draw_distance(spec: PathSpec, rng: np.random.Generator, factor: float = 1.0) -> float:
    """Movement distance d ~ U[lo, hi] * factor from an explicitly seeded generator."""
    lo, hi = spec.distance_range
    return float(rng.uniform(lo, hi)) * factor


def make_trajectory(
    name: str,
    K: torch.Tensor,
    height: int,
    width: int,
    num_frames: int,
    *,
    distance: float,
    center_depth: float = 1.0,
    lookat: str = "textbook",
    initial_w2c: torch.Tensor | None = None,
) -> Cameras:
    """One named Lyra path as ``Cameras`` (frame 0 = initial pose, identity by default)."""
    if name not in ALL_PATHS:
        raise LyraInputError(f"unknown trajectory {name!r}; expected one of {sorted(ALL_PATHS)}")
    if num_frames < 2:
        raise LyraInputError(f"num_frames must be >= 2, got {num_frames}")
    spec = ALL_PATHS[name]
    pos = path_positions(spec, num_frames, distance, center_depth)
    target = torch.tensor([0.0, 0.0, center_depth], dtype=torch.float64).expand_as(pos)
    w2c = look_at_w2c(pos, target, lookat=lookat)
    if initial_w2c is not None:
        w2c = w2c @ initial_w2c.to(torch.float64)
    c2w = invert_se3(w2c).float()
    k = K.to(torch.float32).expand(num_frames, 3, 3).clone()
    return Cameras(c2w, k, height, width)


# --- custom trajectories ----------------------------------------------------------------------------------


def _require(cond: bool, source: str, message: str) -> None:
    if not cond:
        raise LyraInputError(f"{source}: {message}")


JSON_KEYS = ("convention", "image_height", "image_width", "frames")
JSON_FRAME_KEYS = ("c2w", "w2c", "K", "fx", "fy", "cx", "cy", "time")  # time: video poses (dynamic input)


def _known_keys(obj: dict, allowed: tuple[str, ...], source: str, where: str) -> None:
    """Raise naming the first unknown key of ``obj`` and the nearest allowed one (a typo must not be ignored)."""
    for key in obj:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise LyraInputError(f"{source}: {where}unknown key {key!r}{hint}; valid keys: {', '.join(allowed)}")


NPZ_FORM = "numeric arrays w2c (N,4,4), intrinsics (N,3,3) and optional image_height, image_width (integers)"


def _npz_numeric(data, key: str, src: str) -> np.ndarray:
    """Field ``key`` of an open .npz as a float64 array; one ``LyraInputError`` naming the file and field when it
    holds objects (pickles are never loaded), text or a damaged member."""
    try:
        arr = data[key]
    except Exception:  # noqa: BLE001 - object arrays (pickles), damaged zip members
        raise LyraInputError(f"{src}: field '{key}' is not a numeric array (object arrays are not read); "
                             f"expected {NPZ_FORM}") from None
    if arr.dtype.kind not in "iuf":
        raise LyraInputError(f"{src}: field '{key}' has dtype {arr.dtype}, expected a numeric array ({NPZ_FORM})")
    return np.asarray(arr, dtype=np.float64)


def _image_size(value, src: str, field: str) -> int:
    """``image_height`` / ``image_width`` of a trajectory file as a positive integer (one error line else)."""
    arr = np.asarray(value) if not isinstance(value, bool) else np.asarray(None, dtype=object)
    if arr.ndim and arr.size == 1:  # [720] or a (1,) array: one number
        arr = arr.reshape(())
    ok = arr.shape == () and arr.dtype.kind in "iuf" and np.isfinite(arr) and float(arr) >= 1 \
        and float(arr) == int(arr)
    if not ok:
        shown = value.tolist() if isinstance(value, np.ndarray) else value
        raise LyraInputError(f"{src}: field '{field}' must be a positive integer (pixels), got {shown!r}")
    return int(arr)


def _number_array(value, src: str, where: str, shape: tuple[int, ...], form: str) -> np.ndarray:
    """A JSON number, list or nested list as a float64 array of ``shape`` (one error line naming ``where`` else:
    text such as "abc", booleans, null or ragged lists are refused)."""
    try:
        arr = np.asarray(value, dtype=object)
    except ValueError:
        arr = None
    if arr is None or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in arr.flat):
        raise LyraInputError(f"{src}: {where} must be {form}, got {_short(value)}")
    if arr.shape != shape:
        raise LyraInputError(f"{src}: {where} must be {form}, got shape {arr.shape}")
    return arr.astype(np.float64)


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_trajectory_npz(
    path: str | Path, *, height: int, width: int, num_frames: int | None = None, pose_scale: float = 1.0
) -> Cameras:
    """Load a Lyra-2 style ``trajectory.npz`` (keys w2c (N,4,4), intrinsics (N,3,3), image_height, image_width).

    Intrinsics are mapped from (image_height, image_width) to (height, width) like a cover-cropped image
    (:func:`lyra_ops.images.cover_crop_intrinsics`); translations are multiplied
    by ``pose_scale``; poses are re-expressed relative to frame 0 only if frame 0 is not the identity.
    """
    src = str(path)
    if not Path(path).is_file():
        raise LyraInputError(f"{src}: trajectory file not found (expected a .npz file: {NPZ_FORM})")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array")
    except Exception:  # noqa: BLE001 - any failure to parse is an input error (numpy's text may suggest pickles)
        raise LyraInputError(f"{src}: not a valid .npz archive of numeric arrays; expected {NPZ_FORM}") from None
    with data:
        for key in ("w2c", "intrinsics"):
            _require(key in data.files, src, f"missing key '{key}' (found {sorted(data.files)}); expected "
                     "w2c (N,4,4), intrinsics (N,3,3), image_height, image_width")
        w2c = _npz_numeric(data, "w2c", src)
        intr = _npz_numeric(data, "intrinsics", src)
        src_h = _image_size(_npz_numeric(data, "image_height", src), src, "image_height") \
            if "image_height" in data.files else height
        src_w = _image_size(_npz_numeric(data, "image_width", src), src, "image_width") \
            if "image_width" in data.files else width
    _require(w2c.ndim == 3 and w2c.shape[1:] == (4, 4), src, f"field 'w2c' must have shape (N, 4, 4), got {w2c.shape}")
    _require(intr.shape == (w2c.shape[0], 3, 3), src,
             f"field 'intrinsics' must have shape ({w2c.shape[0]}, 3, 3) to match w2c, got {intr.shape}")
    return _finish_custom(torch.from_numpy(w2c), torch.from_numpy(intr), src, src_h, src_w,
                          height, width, num_frames, pose_scale)


def load_trajectory_json(
    path: str | Path, *, height: int, width: int, num_frames: int | None = None, pose_scale: float = 1.0
) -> Cameras:
    """Load a JSON trajectory.

    Format: ``{"convention": "opencv"|"opengl", "image_height": H, "image_width": W, "frames": [
    {"c2w": 4x4 | "w2c": 4x4, "K": 3x3 | "fx", "fy", "cx", "cy"}, ...]}``.
    """
    src = str(path)
    if not Path(path).is_file():
        raise LyraInputError(f"{src}: trajectory file not found (expected a JSON object with a list 'frames')")
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001
        raise LyraInputError(f"{src}: not valid JSON ({exc})") from exc
    _require(isinstance(doc, dict), src, "expected a JSON object with a non-empty list 'frames'")
    _known_keys(doc, JSON_KEYS, src, "")
    _require(isinstance(doc.get("frames"), list) and doc["frames"], src,
             "expected an object with a non-empty list 'frames'")
    convention = doc.get("convention", "opencv")
    _require(convention in ("opencv", "opengl"), src,
             f"field 'convention' must be 'opencv' or 'opengl', got {convention!r}")
    src_h = _image_size(doc["image_height"], src, "image_height") if "image_height" in doc else height
    src_w = _image_size(doc["image_width"], src, "image_width") if "image_width" in doc else width
    w2cs, ks = [], []
    for i, frame in enumerate(doc["frames"]):
        where = f"frames[{i}]"
        _require(isinstance(frame, dict), src, f"{where} must be an object")
        _known_keys(frame, JSON_FRAME_KEYS, src, f"{where}: ")
        key = "c2w" if "c2w" in frame else "w2c" if "w2c" in frame else None
        _require(key is not None, src, f"{where} needs a 'c2w' or 'w2c' 4x4 matrix")
        m = _number_array(frame[key], src, f"{where}.{key}", (4, 4), "a 4x4 matrix of numbers")
        pose = torch.from_numpy(m)[None]
        check_se3(pose, name=f"{where}.{key}", source=src)
        c2w = pose if key == "c2w" else invert_se3(pose)
        if convention == "opengl":
            c2w = c2w @ OPENCV_TO_OPENGL
        pose = invert_se3(c2w)[0]
        if "K" in frame:
            k = torch.from_numpy(_number_array(frame["K"], src, f"{where}.K", (3, 3), "a 3x3 matrix of numbers"))
        else:
            missing = [f for f in ("fx", "fy", "cx", "cy") if f not in frame]
            _require(not missing, src, f"{where} needs 'K' or all of fx, fy, cx, cy (missing {missing})")
            k = intrinsics_matrix(*(torch.tensor(float(_number_array(frame[f], src, f"{where}.{f}", (), "a number")),
                                                 dtype=torch.float64) for f in ("fx", "fy", "cx", "cy")))
        w2cs.append(pose)
        ks.append(k)
    return _finish_custom(torch.stack(w2cs), torch.stack(ks), src, src_h, src_w, height, width, num_frames,
                          pose_scale)


def load_trajectory(path: str | Path, **kwargs) -> Cameras:
    """Load a custom trajectory by extension (.npz or .json)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        return load_trajectory_npz(path, **kwargs)
    if suffix == ".json":
        return load_trajectory_json(path, **kwargs)
    raise LyraInputError(f"{path}: unsupported trajectory file type {suffix!r}; expected .npz or .json")


FRAMES_FORMS = "'clip', 'all', an integer N >= 2 or 'stride K' with K >= 1"


def parse_frames(value: str | int) -> tuple[str, int]:
    """``trajectories.frames`` as (mode, number): ("clip", 0), ("all", 0), ("count", N) or ("stride", K)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 2:
            raise LyraInputError(f"trajectories.frames: expected {FRAMES_FORMS}, got {value!r}")
        return "count", value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("clip", "all"):
            return text, 0
        if text.isdigit():
            return parse_frames(int(text))
        parts = text.split()
        if len(parts) == 2 and parts[0] == "stride" and parts[1].isdigit() and int(parts[1]) >= 1:
            return "stride", int(parts[1])
    raise LyraInputError(f"trajectories.frames: expected {FRAMES_FORMS}, got {value!r}")


def select_frames(total: int, frames: str | int, clip: int, temporal: int = 8) -> tuple[list[int], int]:
    """Frame indices of a ``total``-frame path kept under ``trajectories.frames`` (see :func:`parse_frames`), and
    how many of them hold the last pose to reach a length of ``temporal`` k + 1 (the latent grid).

    ``clip``: the first ``clip`` frames (the video model's length; ``LyraInputError`` when the path is shorter);
    ``all``: every frame; N: N frames evenly spaced from the first to the last (rounded to the nearest index);
    ``stride K``: frames 0, K, 2K, ... (and the last frame, so the path ends where it ends)."""
    mode, n = parse_frames(frames)
    if mode == "clip":
        if total < clip:
            raise LyraInputError(f"the path has {total} frames but {clip} were requested (video.num_frames); set "
                                 "trajectories.frames to all, N or 'stride K'")
        picks = list(range(clip))
    elif mode == "all":
        picks = list(range(total))
    elif mode == "count":
        if n > total:
            raise LyraInputError(f"trajectories.frames: {n} frames requested but the path has {total}")
        picks = [round(i * (total - 1) / (n - 1)) for i in range(n)]
    else:
        picks = list(range(0, total, n))
        if picks[-1] != total - 1:
            picks.append(total - 1)
    held = (-(len(picks) - 1)) % temporal
    return picks + [picks[-1]] * held, held


def _finish_custom(
    w2c: torch.Tensor, intr: torch.Tensor, src: str, src_h: int, src_w: int,
    height: int, width: int, num_frames: int | None, pose_scale: float,
) -> Cameras:
    check_se3(w2c, name="w2c", source=src)
    finite = torch.isfinite(intr).flatten(1).all(dim=1)
    if not bool(finite.all()):
        raise LyraInputError(f"{src}: intrinsics[{int((~finite).nonzero()[0])}] contains NaN or Inf values")
    bad_f = (intr[:, 0, 0] <= 0) | (intr[:, 1, 1] <= 0)
    if bool(bad_f.any()):
        raise LyraInputError(f"{src}: intrinsics[{int(bad_f.nonzero()[0])}] must have positive fx and fy")
    if num_frames is not None:
        _require(w2c.shape[0] >= num_frames, src,
                 f"has {w2c.shape[0]} frames but {num_frames} were requested")
        w2c, intr = w2c[:num_frames], intr[:num_frames]
    # Express all poses relative to frame 0 so that world = first camera frame, as the pipeline assumes.
    rel = w2c @ invert_se3(w2c[:1])
    rel[:, :3, 3] *= pose_scale
    # The intrinsics go through the same resize-to-cover + centre crop as a src_h x src_w image would
    # (one uniform scale and an offset), so pixels stay square and the path matches a cover-cropped input image.
    k = cover_crop_intrinsics(intr, src_h, src_w, height, width)
    return Cameras(invert_se3(rel).float(), k.float(), height, width)
