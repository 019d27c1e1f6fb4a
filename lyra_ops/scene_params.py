"""Parameters of the procedural scenes: room extents, materials, objects and the prompt, drawn from
``numpy.random.default_rng(seed)``. Pure numpy: the scene list of a run (ids, prompts, content hashes) is
built from these without importing torch; :mod:`lyra_ops.scenes` renders them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lyra_ops.errors import LyraInputError

__all__ = ["FIRST_OBJECT_ID", "ROOM_SURFACE_IDS", "Material", "Primitive", "Room", "SceneParams", "sample_scene"]

# Stable ids of the room surfaces; primitives get ids 6, 7, ... in creation order.
ROOM_SURFACE_IDS: dict[str, int] = {
    "floor": 0,
    "ceiling": 1,
    "back_wall": 2,
    "front_wall": 3,
    "left_wall": 4,
    "right_wall": 5,
}
FIRST_OBJECT_ID = 6

# Named colours (display-space albedo) used by the textures and the prompt.
_PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.80, 0.13, 0.11),
    "orange": (0.94, 0.50, 0.12),
    "yellow": (0.96, 0.83, 0.18),
    "green": (0.20, 0.60, 0.24),
    "teal": (0.08, 0.55, 0.55),
    "blue": (0.16, 0.32, 0.82),
    "navy": (0.09, 0.13, 0.40),
    "purple": (0.50, 0.23, 0.66),
    "pink": (0.94, 0.52, 0.68),
    "white": (0.93, 0.93, 0.90),
    "black": (0.09, 0.09, 0.10),
    "grey": (0.52, 0.52, 0.54),
    "lime": (0.62, 0.86, 0.22),
    "brown": (0.45, 0.27, 0.13),
}
_OBJECT_COLOURS = ("red", "orange", "yellow", "green", "teal", "blue", "navy", "purple", "pink", "lime")
_LIGHT_COLOURS = ("white", "yellow", "grey", "black", "orange", "pink")

_FLOOR_STYLES = ("planks", "checker", "stone")
_WALL_STYLES = ("brick", "wallpaper", "panels")
_WOODS = (
    ("light oak", (0.78, 0.58, 0.36), (0.55, 0.36, 0.18)),
    ("dark walnut", (0.46, 0.29, 0.16), (0.25, 0.14, 0.07)),
    ("honey pine", (0.86, 0.66, 0.38), (0.66, 0.44, 0.20)),
)


@dataclass(frozen=True)
class Material:
    pattern: str
    colours: tuple[tuple[float, float, float], ...]
    colour_names: tuple[str, ...]
    scale: float
    salt: int
    words: str

    def to_json(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "colours": [list(c) for c in self.colours],
            "colour_names": list(self.colour_names),
            "scale": self.scale,
            "salt": self.salt,
        }


# ----------------------------------------------------------------------------------------------------------
# Scene parameters
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Room:
    x_min: float
    x_max: float
    ceiling_y: float
    floor_y: float
    front_z: float
    back_z: float


@dataclass(frozen=True)
class Primitive:
    """One object.  kind: 'sphere' | 'box' | 'cylinder'.

    sphere: half = (r, r, r); box: half-extents in its local frame, rotated by ``yaw`` about world y;
    cylinder: vertical axis, half = (r, half_height, r).  ``rot`` (3x3, row-major) maps world offsets to the
    texture frame: local = rot @ (p - center).
    """

    obj_id: int
    kind: str
    center: tuple[float, float, float]
    half: tuple[float, float, float]
    yaw: float
    rot: tuple[float, ...]
    grounded: bool
    material: Material
    description: str

    def horizontal_radius(self) -> float:
        if self.kind == "box":
            return math.hypot(self.half[0], self.half[2])
        return self.half[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.obj_id,
            "type": self.kind,
            "center": list(self.center),
            "half_extents": list(self.half),
            "yaw_rad": self.yaw,
            "texture_rotation": list(self.rot),
            "grounded": self.grounded,
            "material": self.material.to_json(),
            "description": self.description,
        }


def _rot_matrix(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _yaw_matrix_world_to_local(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    # world = Ry(yaw) @ local, Ry = [[c,0,s],[0,1,0],[-s,0,c]]  ->  local = Ry^T @ world
    return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])


def _pick_two(rng: np.random.Generator, names: tuple[str, ...]) -> tuple[str, str]:
    i, j = rng.choice(len(names), size=2, replace=False)
    return names[int(i)], names[int(j)]


def _room_materials(rng: np.random.Generator) -> tuple[dict[str, Material], str]:
    salt = int(rng.integers(0, 2**31 - 1))
    floor_style = _FLOOR_STYLES[int(rng.integers(0, len(_FLOOR_STYLES)))]
    if floor_style == "planks":
        wood_name, light, dark = _WOODS[int(rng.integers(0, len(_WOODS)))]
        floor = Material(
            "planks",
            (light, dark),
            (wood_name,),
            float(rng.uniform(0.16, 0.24)),
            salt,
            f"a {wood_name} wooden plank floor",
        )
    elif floor_style == "checker":
        n0, n1 = _pick_two(rng, ("black", "white", "red", "navy", "grey", "green", "yellow"))
        floor = Material(
            "checker",
            (_PALETTE[n0], _PALETTE[n1]),
            (n0, n1),
            float(rng.uniform(0.3, 0.5)),
            salt,
            f"a {n0} and {n1} checkered tile floor",
        )
    else:
        floor = Material(
            "stone",
            ((0.5, 0.5, 0.5),),
            ("grey",),
            float(rng.uniform(0.4, 0.6)),
            salt,
            "a grey stone tile floor",
        )
    wall_style = _WALL_STYLES[int(rng.integers(0, len(_WALL_STYLES)))]
    wsalt = salt + 101
    if wall_style == "brick":
        name, rgb = [
            ("red", (0.62, 0.22, 0.14)),
            ("orange", (0.72, 0.40, 0.22)),
            ("grey", (0.50, 0.48, 0.46)),
            ("white", (0.85, 0.83, 0.78)),
        ][int(rng.integers(0, 4))]
        walls = Material(
            "brick",
            (rgb, (0.35, 0.2, 0.15)),
            (name,),
            float(rng.uniform(0.22, 0.3)),
            wsalt,
            f"{name} brick walls",
        )
    elif wall_style == "wallpaper":
        n0, n1 = _pick_two(rng, ("white", "teal", "green", "blue", "pink", "yellow", "purple", "grey"))
        c0 = tuple(0.35 + 0.6 * v for v in _PALETTE[n0])
        c1 = tuple(0.25 + 0.6 * v for v in _PALETTE[n1])
        walls = Material(
            "wallpaper",
            (c0, c1),
            (n0, n1),
            float(rng.uniform(0.18, 0.3)),
            wsalt,
            f"{n0} and {n1} striped wallpaper on the walls",
        )
    else:
        walls = Material(
            "panels",
            ((0.70, 0.48, 0.28), (0.42, 0.25, 0.12)),
            ("wood",),
            float(rng.uniform(0.2, 0.32)),
            wsalt,
            "wood-panelled walls",
        )
    ceiling = Material(
        "ceiling",
        ((0.9, 0.89, 0.86), (0.6, 0.6, 0.58)),
        ("white",),
        float(rng.uniform(0.5, 0.7)),
        salt + 202,
        "a white panelled ceiling",
    )
    words = f"{floor.words}, {walls.words} and {ceiling.words}"
    return {"floor": floor, "walls": walls, "ceiling": ceiling}, words


_OBJECT_PATTERNS = {
    "sphere": (
        ("checker_sph", "checkered", (4, 7)),
        ("stripes", "striped", (1.5, 3.0)),
        ("dots", "polka-dotted", (1.8, 2.8)),
        ("marble", "marbled", (3.0, 6.0)),
    ),
    "box": (
        ("checker3d", "checkered", (2.0, 4.0)),
        ("wood", "wooden", (5.0, 9.0)),
        ("stripes", "striped", (1.5, 3.0)),
        ("marble", "marbled", (3.0, 6.0)),
    ),
    "cylinder": (
        ("bands", "ringed", (1.0, 2.5)),
        ("vstripes", "vertically striped", (5, 9)),
        ("checker_cyl", "checkered", (5, 8)),
        ("marble", "marbled", (3.0, 6.0)),
    ),
}


def _object_material(rng: np.random.Generator, kind: str) -> Material:
    pattern, adjective, (lo, hi) = _OBJECT_PATTERNS[kind][int(rng.integers(0, 4))]
    if pattern == "wood":
        names = ("wood", "wood")
        colours = ((0.80, 0.58, 0.33), (0.48, 0.28, 0.12))
        words = "wooden"
    else:
        n0 = _OBJECT_COLOURS[int(rng.integers(0, len(_OBJECT_COLOURS)))]
        n1 = _LIGHT_COLOURS[int(rng.integers(0, len(_LIGHT_COLOURS)))]
        if n1 == n0:
            n1 = "white"
        names = (n0, n1)
        colours = (_PALETTE[n0], _PALETTE[n1])
        words = f"{n0} and {n1} {adjective}" if pattern != "marble" else f"{n0} marbled"
    scale = float(rng.uniform(lo, hi)) if isinstance(lo, float) else float(rng.integers(lo, hi + 1))
    return Material(pattern, colours, names, scale, int(rng.integers(0, 2**31 - 1)), words)


def _position_words(x: float, z: float, bottom_y: float, floor_y: float, column: bool) -> str:
    """Rough position phrase of an object seen from the origin camera (for the prompt)."""
    a = x / z
    horiz = "on the left" if a < -0.15 else ("on the right" if a > 0.15 else "in the centre")
    depth = (
        "in the foreground" if z < 1.4 else ("in the middle of the room" if z < 2.5 else "in the background")
    )
    if column:
        return f"standing {depth} {horiz}, reaching from the floor to the ceiling"
    if abs(bottom_y - floor_y) < 1e-9:
        return f"resting on the floor {depth} {horiz}"
    return f"floating in mid-air {depth} {horiz}"


def _sample_objects(rng: np.random.Generator, room: Room) -> list[Primitive]:
    """Place 3-6 non-intersecting primitives in view of the origin camera, at least one on-screen overlap."""
    n = int(rng.integers(3, 7))
    best: list[dict[str, Any]] = []
    for _attempt in range(60):
        kinds = ["sphere", "box"] + [str(k) for k in rng.choice(["sphere", "box", "cylinder"], size=n - 2)]
        rng.shuffle(kinds)
        # stratified depths: spread from near (0.7) to far (3.5)
        edges = np.linspace(0.75, 3.4, n + 1)
        depths = rng.uniform(edges[:-1], edges[1:])
        rng.shuffle(depths)
        placed: list[dict[str, Any]] = []
        for kind, z in zip(kinds, depths, strict=True):
            for _try in range(40):
                obj = _propose(rng, kind, float(z), room)
                if obj is not None and _fits(obj, placed, room):
                    placed.append(obj)
                    break
        if len(placed) < 3:
            continue
        if len(placed) > len(best) or (len(placed) == len(best) and not _has_overlap(best)):
            best = placed
        if len(placed) == n and _has_overlap(placed):
            break
    prims = []
    for k, obj in enumerate(best):
        mat = _object_material(rng, obj["kind"])
        rot = _rot_matrix(rng) if obj["kind"] == "sphere" else _yaw_matrix_world_to_local(obj["yaw"])
        shape_word = {"sphere": "sphere", "box": "box", "cylinder": "cylinder"}[obj["kind"]]
        if obj["kind"] == "box" and obj["half"][1] > 1.6 * max(obj["half"][0], obj["half"][2]):
            shape_word = "tall box"
        if obj["column"]:
            shape_word = "column"
        if mat.pattern == "wood" and obj["kind"] == "box":
            shape_word = "crate" if shape_word == "box" else shape_word
        bottom_y = obj["center"][1] + obj["half"][1]
        where = _position_words(obj["center"][0], obj["center"][2], bottom_y, room.floor_y, obj["column"])
        words = f"{mat.words} {shape_word}"
        desc = f"{'an' if words[0] in 'aeiou' else 'a'} {words} {where}"
        prims.append(
            Primitive(
                obj_id=FIRST_OBJECT_ID + k,
                kind=obj["kind"],
                center=tuple(float(v) for v in obj["center"]),
                half=tuple(float(v) for v in obj["half"]),
                yaw=float(obj["yaw"]),
                rot=tuple(float(v) for v in np.asarray(rot).reshape(-1)),
                grounded=bool(obj["grounded"]),
                material=mat,
                description=desc,
            )
        )
    return prims


def _propose(rng: np.random.Generator, kind: str, z: float, room: Room) -> dict[str, Any] | None:
    frac = rng.uniform(0.075, 0.14)  # half-size as a fraction of the depth (angular size)
    size = frac * z
    a = rng.uniform(-0.52 + frac, 0.52 - frac)
    b = rng.uniform(-0.3 + 1.2 * frac, 0.3 - 1.2 * frac)
    x = a * z
    yaw = 0.0
    grounded = z > 2.0 and rng.uniform() < 0.55
    column = False
    if kind == "sphere":
        r = size * (1.25 if grounded else 1.0)
        half = (r, r, r)
        y = room.floor_y - r if grounded else b * z
    elif kind == "box":
        yaw = float(rng.uniform(-math.pi / 3, math.pi / 3))
        hx, hz = size * rng.uniform(0.6, 1.1), size * rng.uniform(0.6, 1.1)
        if grounded:
            top = z * rng.uniform(-0.15, 0.12)
            hy = (room.floor_y - top) / 2.0
            y = room.floor_y - hy
        else:
            hy = size * rng.uniform(0.6, 1.1)
            y = b * z
        half = (hx, hy, hz)
    else:
        r = size * rng.uniform(0.55, 0.85)
        if z > 1.7 and rng.uniform() < 0.5:
            column, grounded = True, True
            hh = (room.floor_y - room.ceiling_y) / 2.0
            y = (room.floor_y + room.ceiling_y) / 2.0
        elif grounded:
            top = z * rng.uniform(-0.12, 0.15)
            hh = (room.floor_y - top) / 2.0
            y = room.floor_y - hh
        else:
            hh = size * rng.uniform(0.6, 1.2)
            y = b * z
        half = (r, hh, r)
    return {
        "kind": kind,
        "center": (x, y, z),
        "half": half,
        "yaw": yaw,
        "grounded": grounded,
        "column": column,
    }


def _fits(obj: dict[str, Any], placed: list[dict[str, Any]], room: Room) -> bool:
    x, y, z = obj["center"]
    hx, hy, hz = obj["half"]
    rad = math.hypot(hx, hz) if obj["kind"] == "box" else hx
    margin = 0.1
    if x - rad < room.x_min + margin or x + rad > room.x_max - margin or z + rad > room.back_z - margin:
        return False
    if y - hy < room.ceiling_y - 1e-9 or y + hy > room.floor_y + 1e-9:
        return False
    # keep clear of cameras within ~0.4 of the origin
    if z - rad < 0.5 or math.sqrt(x * x + y * y + z * z) - max(hx, hy, hz) * 1.8 < 0.5:
        return False
    for other in placed:
        ox, oy, oz = other["center"]
        ohx, ohy, ohz = other["half"]
        orad = math.hypot(ohx, ohz) if other["kind"] == "box" else ohx
        apart_h = math.hypot(x - ox, z - oz) > rad + orad + 0.12
        apart_v = (y - hy > oy + ohy + 0.12) or (oy - ohy > y + hy + 0.12)
        if not (apart_h or apart_v):
            return False
    return True


def _screen_disc(obj: dict[str, Any]) -> tuple[float, float, float]:
    x, y, z = obj["center"]
    hx, hy, hz = obj["half"]
    return x / z, y / z, min(math.hypot(hx, hz), hy) / z


def _has_overlap(objs: list[dict[str, Any]]) -> bool:
    discs = [_screen_disc(o) for o in objs]
    for i in range(len(discs)):
        for j in range(i + 1, len(discs)):
            (a0, b0, r0), (a1, b1, r1) = discs[i], discs[j]
            d = math.hypot(a0 - a1, b0 - b1)
            if abs(r0 - r1) * 0.5 < d < (r0 + r1) * 0.95:
                return True
    return False


@dataclass(frozen=True)
class SceneParams:
    """Everything that defines one procedural scene (rendering adds nothing random)."""

    seed: int
    kind: str
    prompt: str
    room: Room
    prims: tuple[Primitive, ...]
    materials: dict[str, Material]

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable parameters of the scene (provenance)."""
        r = self.room
        return {
            "generator": "lyra_ops.scenes",
            "seed": self.seed,
            "kind": self.kind,
            "prompt": self.prompt,
            "room": {
                "x_min": r.x_min,
                "x_max": r.x_max,
                "ceiling_y": r.ceiling_y,
                "floor_y": r.floor_y,
                "front_z": r.front_z,
                "back_z": r.back_z,
                "surface_ids": dict(ROOM_SURFACE_IDS),
                "materials": {k: m.to_json() for k, m in self.materials.items()},
            },
            "objects": [p.to_json() for p in self.prims],
        }


def sample_scene(seed: int, *, kind: str = "room") -> SceneParams:
    """Draw the deterministic scene parameters for ``seed`` (a non-negative int); only ``kind='room'`` exists.

    Uses ``numpy.random.default_rng(seed)`` only (the global numpy RNG is untouched).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise LyraInputError(f"seed must be a non-negative int, got {seed!r}")
    if kind != "room":
        raise LyraInputError(f"kind must be 'room' (the only scene family), got {kind!r}")
    seed = int(seed)
    rng = np.random.default_rng(seed)
    room = Room(
        x_min=-float(rng.uniform(2.0, 2.8)),
        x_max=float(rng.uniform(2.0, 2.8)),
        ceiling_y=-float(rng.uniform(1.2, 1.6)),
        floor_y=float(rng.uniform(0.85, 1.1)),
        front_z=-float(rng.uniform(1.5, 2.5)),
        back_z=float(rng.uniform(4.2, 5.8)),
    )
    materials, room_words = _room_materials(rng)
    prims = tuple(_sample_objects(rng, room))
    object_words = "; ".join(p.description for p in sorted(prims, key=lambda q: q.center[2]))
    prompt = (
        f"A view into an indoor room with {room_words}. "
        f"Inside the room there is {object_words}. Soft light from a lamp under the ceiling."
    )
    return SceneParams(seed, kind, prompt, room, prims, materials)
