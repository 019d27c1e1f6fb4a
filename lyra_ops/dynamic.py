"""Dynamic procedural scenes and dynamic camera paths (Lyra's video -> 4D variant, spec section 3).

A :class:`DynamicScene` is a procedural room (:mod:`lyra_ops.scenes`) whose objects move rigidly along analytic
paths of normalised time ``tau`` in [0, 1] (the input video runs from tau 0 to tau 1):

- ``translate``: back and forth along a horizontal direction, ``c(tau) = c0 + A sin(2 pi f tau) d``;
- ``rotate``: a spin about the vertical axis, yaw ``y0 + w tau`` (boxes turn; textures turn with every object);
- ``bounce``: hops off the floor, ``c_y(tau) = c0_y - H |sin(pi f tau)|`` (y points down).

Every object keeps its texture attached (the texture frame moves with it), so the scene at any time is again an
exact analytic scene: :meth:`DynamicScene.render` renders any camera at any time with exact depth, the ground
truth of dynamic novel views. Motions are drawn from the scene seed and shrunk until the swept object stays in
the room, clear of the other objects and of the cameras' space near the origin.

Dynamic paths (spec section 3): target frame ``t`` of a novel path is ``w2c_t = M_t w2c_in_t``, the static
path's offset ``M_t`` (:func:`lyra_ops.trajectories.make_trajectory` from the identity) composed with the input
camera's own pose at that frame, at the input's time ``tau_t``. Flip supervision generates from the
time-reversed input: generation step ``j`` sees input frame ``T-1-j`` with offset ``M_j``. Stored back in the
original time order, frame ``i`` of a flipped path has time ``tau_i`` and camera ``M_{T-1-i} w2c_in_i``:
frames, times and poses are all reversed consistently (the reference reverses the frames but saves the poses
in generation order, spec section 8 item 4).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import torch

from lyra_ops.cameras import Cameras, invert_se3
from lyra_ops.errors import LyraInputError
from lyra_ops.motions import Motion, describe_dynamic, dynamic_prompt, moved, sample_motions
from lyra_ops.scene_params import SceneParams, sample_scene
from lyra_ops.scenes import ProceduralScene, SceneRender
from lyra_ops.seeding import derive_seed
from lyra_ops.trajectories import look_at_w2c, make_trajectory


class DynamicScene:
    """A procedural room whose objects move (see the module docstring); render it at any camera and time."""

    def __init__(self, params: SceneParams, motions: tuple[Motion, ...]) -> None:
        self.params = params
        self.motions = motions
        self._by_id = {m.obj_id: m for m in motions}
        self._cache: OrderedDict[float, ProceduralScene] = OrderedDict()

    @property
    def seed(self) -> int:
        return self.params.seed

    @property
    def prompt(self) -> str:
        return dynamic_prompt(self.params, self.motions)

    def at(self, tau: float) -> ProceduralScene:
        """The static scene at time ``tau`` (an exact analytic scene; a few recent ones are cached)."""
        tau = float(tau)
        if not math.isfinite(tau):
            raise LyraInputError(f"time {tau!r}: expected a finite number (0 = first input frame, 1 = last)")
        if tau not in self._cache:
            prims = tuple(moved(p, self._by_id.get(p.obj_id), tau) for p in self.params.prims)
            self._cache[tau] = ProceduralScene(replace(self.params, prims=prims))
            if len(self._cache) > 8:
                self._cache.popitem(last=False)
        self._cache.move_to_end(tau)
        return self._cache[tau]

    def render(self, c2w: torch.Tensor, K: torch.Tensor, height: int, width: int,
               times: torch.Tensor | list[float]) -> SceneRender:
        """Render view ``i`` (c2w (N,4,4), K (N,3,3)) at time ``times[i]``, exactly."""
        times = [float(t) for t in (times.tolist() if isinstance(times, torch.Tensor) else times)]
        if len(times) != c2w.shape[0]:
            raise LyraInputError(f"render: {c2w.shape[0]} cameras but {len(times)} times")
        parts = [self.at(t).render(c2w[i : i + 1], K[i : i + 1], height, width) for i, t in enumerate(times)]
        return SceneRender(rgb=torch.cat([p.rgb for p in parts]), depth=torch.cat([p.depth for p in parts]),
                           object_id=torch.cat([p.object_id for p in parts]))

    def describe(self) -> dict:
        return describe_dynamic(self.params, self.motions)


def make_dynamic_scene(seed: int, *, moving: int = 2) -> DynamicScene:
    """The dynamic scene of ``seed``: the static scene of that seed with ``moving`` objects set in motion."""
    params = sample_scene(seed)
    return DynamicScene(params, sample_motions(params, moving))


# ------------------------------------------------------------------------------------------------------------
# Camera paths
# ------------------------------------------------------------------------------------------------------------


def frame_times(num_frames: int) -> torch.Tensor:
    """Normalised times of a clip's frames: 0 for the first, 1 for the last."""
    if num_frames < 2:
        raise LyraInputError(f"a dynamic clip needs at least 2 frames, got {num_frames}")
    return torch.linspace(0.0, 1.0, num_frames, dtype=torch.float64)


def input_camera_path(seed: int, K: torch.Tensor, height: int, width: int, num_frames: int,
                      speed: float = 0.15) -> Cameras:
    """A procedural input video's camera: a slow seeded sideways drift with a slight turn towards the room
    centre (the monocular video a user would shoot), frame 0 at the identity."""
    rng = np.random.default_rng(derive_seed(seed, "dynamic-input-camera"))
    tau = frame_times(num_frames)
    angle = float(rng.uniform(0, 2 * math.pi))
    dx, dy = math.cos(angle) * speed, 0.3 * math.sin(angle) * speed
    pos = torch.stack([dx * tau, dy * tau, 0.05 * speed * tau], dim=1)
    target = torch.tensor([0.0, 0.0, 2.5], dtype=torch.float64).expand_as(pos)
    w2c = look_at_w2c(pos, target)
    rel = w2c @ invert_se3(w2c[:1])  # frame 0 -> the identity, the others relative to it
    return Cameras(invert_se3(rel).float(), K.float().expand(num_frames, 3, 3).clone(), height, width)


@dataclass(frozen=True)
class DynamicPath:
    """Target cameras of one novel path of a dynamic scene and the time of each frame (original time order)."""

    name: str
    cameras: Cameras
    times: torch.Tensor  # (T,) float64 in [0, 1]
    flipped: bool
    source_frames: torch.Tensor  # (T,) int: the input frame each target frame is warped from (same time)


def dynamic_path(name: str, input_cameras: Cameras, *, distance: float, center_depth: float = 1.0,
                 flipped: bool = False, lookat: str = "textbook") -> DynamicPath:
    """Novel path ``name`` for an input video with cameras ``input_cameras`` (T frames): ``M_t w2c_in_t`` at time
    ``tau_t``; ``flipped``: the time-reversed generation stored back in time order, ``M_{T-1-t} w2c_in_t``."""
    n, h, w = len(input_cameras), input_cameras.height, input_cameras.width
    offsets = make_trajectory(name, input_cameras.K[0], h, w, n, distance=distance, center_depth=center_depth,
                              lookat=lookat)
    m = invert_se3(offsets.c2w.double())  # M_j: the static path's w2c with the input camera at the identity
    if flipped:
        m = m.flip(0)
    w2c = m @ input_cameras.w2c.double()
    cams = Cameras(invert_se3(w2c).float(), input_cameras.K.clone(), h, w)
    return DynamicPath(name, cams, frame_times(n), flipped, torch.arange(n))


def generation_index(path: DynamicPath) -> torch.Tensor:
    """The stored frames of ``path`` in the order a teacher generates them: a flipped path runs backwards in
    time (step ``j`` is stored frame ``T-1-j``)."""
    n = len(path.cameras)
    return torch.arange(n - 1, -1, -1) if path.flipped else torch.arange(n)


def generation_order(path: DynamicPath) -> tuple[Cameras, torch.Tensor, torch.Tensor]:
    """What a teacher conditioned on this path generates, in generation order: (cameras, times, source frames)."""
    idx = generation_index(path)
    return path.cameras[idx], path.times[idx], path.source_frames[idx]
