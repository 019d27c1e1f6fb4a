"""Rigid motions of procedural objects over normalised time (torch-free: the scene list of a dynamic run is built
without torch, as the static one is). :mod:`lyra_ops.dynamic` renders the moving scenes."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from lyra_ops.errors import LyraInputError
from lyra_ops.scene_params import Primitive, SceneParams
from lyra_ops.seeding import derive_seed

MOTION_KINDS = ("translate", "rotate", "bounce")
CAMERA_CLEARANCE = 0.6  # moving objects keep this far from the origin (where the input and novel cameras are)


@dataclass(frozen=True)
class Motion:
    """Rigid motion of one object over normalised time tau in [0, 1]."""

    obj_id: int
    kind: str  # translate | rotate | bounce
    direction: tuple[float, float] = (1.0, 0.0)  # translate: unit (dx, dz)
    amplitude: float = 0.0  # translate: metres; bounce: hop height; rotate: radians over the clip
    cycles: float = 1.0  # translate: periods over the clip; bounce: hops over the clip
    phase: float = 0.0  # translate: radians

    def offset(self, tau: float) -> tuple[float, float, float, float]:
        """(dx, dy, dz, dyaw) at time ``tau``."""
        if self.kind == "translate":
            s = self.amplitude * math.sin(2 * math.pi * self.cycles * tau + self.phase) - \
                self.amplitude * math.sin(self.phase)  # the object starts at its sampled place
            return s * self.direction[0], 0.0, s * self.direction[1], 0.0
        if self.kind == "bounce":
            return 0.0, -self.amplitude * abs(math.sin(math.pi * self.cycles * tau)), 0.0, 0.0
        if self.kind == "rotate":
            return 0.0, 0.0, 0.0, self.amplitude * tau
        raise LyraInputError(f"motion kind {self.kind!r}: expected one of {MOTION_KINDS}")

    def to_json(self) -> dict:
        return {"object": self.obj_id, "kind": self.kind, "direction": list(self.direction),
                "amplitude": self.amplitude, "cycles": self.cycles, "phase": self.phase}


def _yaw_rotation(angle: float) -> np.ndarray:
    """World rotation by ``angle`` about the vertical (y) axis, the sense in which a box's ``yaw`` grows
    (its local frame is ``lx = c wx - s wz, lz = s wx + c wz``)."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def moved(prim: Primitive, motion: Motion | None, tau: float) -> Primitive:
    """``prim`` at time ``tau``: centre shifted and turned about its vertical axis, texture frame carried along."""
    if motion is None:
        return prim
    dx, dy, dz, dyaw = motion.offset(tau)
    if dyaw == 0.0 and dx == dy == dz == 0.0:
        return prim
    center = (prim.center[0] + dx, prim.center[1] + dy, prim.center[2] + dz)
    # texture coordinates: local = rot0 @ R(-dyaw) (p - c): a point that turned with the object reads the same
    rot = (np.asarray(prim.rot).reshape(3, 3) @ _yaw_rotation(dyaw).T).reshape(-1)
    return replace(prim, center=center, yaw=prim.yaw + dyaw, rot=tuple(float(v) for v in rot))


def _noun(description: str) -> str:
    """"a green striped sphere resting on the floor ..." -> "green striped sphere"."""
    text = description.removeprefix("a ").removeprefix("an ")
    cuts = [i for w in (" floating", " resting", " standing", " hanging", " in ", " on ") if (i := text.find(w)) > 0]
    return text[: min(cuts)] if cuts else text


def _clear(prim: Primitive, motion: Motion, others: list[Primitive], params: SceneParams, samples: int = 24) -> bool:
    """True when the object, moved along ``motion``, stays in the room, off the other objects and away from the
    cameras at every sampled time."""
    room = params.room
    rad = prim.horizontal_radius()
    for k in range(samples + 1):
        x, y, z = moved(prim, motion, k / samples).center
        if x - rad < room.x_min + 0.05 or x + rad > room.x_max - 0.05 or z + rad > room.back_z - 0.05:
            return False
        if motion.kind == "bounce" and y - prim.half[1] < room.ceiling_y + 0.05:  # only hops change the height
            return False
        if math.sqrt(x * x + y * y + z * z) - max(prim.half) < CAMERA_CLEARANCE or z - rad < 0.4:
            return False
        for o in others:
            ox, oy, oz = o.center
            apart_h = math.hypot(x - ox, z - oz) > rad + o.horizontal_radius() + 0.03
            apart_v = (y - prim.half[1] > oy + o.half[1] + 0.03) or (oy - o.half[1] > y + prim.half[1] + 0.03)
            if not (apart_h or apart_v):
                return False
    return True


def sample_motions(params: SceneParams, moving: int = 2) -> tuple[Motion, ...]:
    """Up to ``moving`` objects of the scene get a motion each, drawn from the scene seed; an amplitude is
    halved (up to 4 times) until the motion is clear (:func:`_clear`), else that object is given a spin."""
    rng = np.random.default_rng(derive_seed(params.seed, "dynamic-motions"))
    prims = list(params.prims)
    order = rng.permutation(len(prims))[:moving]
    motions: list[Motion] = []
    for idx in order:
        prim = prims[int(idx)]
        kind = MOTION_KINDS[int(rng.integers(len(MOTION_KINDS)))]
        if kind == "bounce" and not prim.grounded:
            kind = "translate"
        angle = float(rng.uniform(0, 2 * math.pi))
        if kind == "translate":
            motion = Motion(prim.obj_id, kind, (math.cos(angle), math.sin(angle)), float(rng.uniform(0.25, 0.5)),
                            float(rng.choice([0.5, 1.0])), float(rng.uniform(0, 2 * math.pi)))
        elif kind == "bounce":
            motion = Motion(prim.obj_id, kind, amplitude=float(rng.uniform(0.2, 0.4)),
                            cycles=float(rng.choice([1.0, 2.0])))
        else:
            motion = Motion(prim.obj_id, kind, amplitude=float(rng.choice([-1, 1]) * rng.uniform(1.0, 2.5)))
        others = [p for p in prims if p.obj_id != prim.obj_id]
        for _ in range(4):
            if _clear(prim, motion, others, params):
                break
            motion = replace(motion, amplitude=motion.amplitude / 2)
        else:
            if not _clear(prim, motion, others, params):
                motion = Motion(prim.obj_id, "rotate", amplitude=1.5)
        motions.append(motion)
    return tuple(sorted(motions, key=lambda m: m.obj_id))


def dynamic_prompt(params: SceneParams, motions: tuple[Motion, ...]) -> str:
    """The static scene's prompt plus what moves, e.g. "The green striped sphere bounces." """
    words = {"translate": "slides back and forth", "rotate": "turns", "bounce": "bounces"}
    by_id = {m.obj_id: m for m in motions}
    moving = [f"the {_noun(p.description)} {words[by_id[p.obj_id].kind]}" for p in params.prims if p.obj_id in by_id]
    if not moving:
        return params.prompt
    return params.prompt + " " + ("; ".join(moving) + ".").replace("the", "The", 1)


def describe_dynamic(params: SceneParams, motions: tuple[Motion, ...]) -> dict:
    """JSON-serialisable parameters of a dynamic scene (provenance; its hash identifies the scene)."""
    return {**params.describe(), "motions": [m.to_json() for m in motions]}
