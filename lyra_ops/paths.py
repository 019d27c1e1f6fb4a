"""Lyra's trajectory families as plain data (no torch), so configs validate names without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PathSpec:
    """One of Lyra's trajectory families: kind, axis/sign (linear) or spiral direction, distance range."""

    name: str
    kind: str  # "linear" | "spiral"
    axis: int = 0
    sign: float = 1.0
    distance_range: tuple[float, float] = (0.2, 0.3)


# Lyra's six "multi_trajectory" paths, in folder order 0..5 (spec section 1.5).
LYRA_PATHS: dict[str, PathSpec] = {
    "left": PathSpec("left", "linear", axis=0, sign=-1.0, distance_range=(0.2, 0.3)),
    "right": PathSpec("right", "linear", axis=0, sign=1.0, distance_range=(0.2, 0.3)),
    "up": PathSpec("up", "linear", axis=1, sign=-1.0, distance_range=(0.1, 0.2)),
    "zoom_out": PathSpec("zoom_out", "linear", axis=2, sign=-1.0, distance_range=(0.3, 0.4)),
    "zoom_in": PathSpec("zoom_in", "linear", axis=2, sign=1.0, distance_range=(0.3, 0.4)),
    "clockwise": PathSpec("clockwise", "spiral", sign=1.0, distance_range=(0.4, 0.6)),
}
# Paths Lyra's generators can make but its SDG does not use by default.
EXTRA_PATHS: dict[str, PathSpec] = {
    "down": PathSpec("down", "linear", axis=1, sign=1.0, distance_range=(0.1, 0.2)),
    "counterclockwise": PathSpec("counterclockwise", "spiral", sign=-1.0, distance_range=(0.4, 0.6)),
}
ALL_PATHS: dict[str, PathSpec] = {**LYRA_PATHS, **EXTRA_PATHS}
