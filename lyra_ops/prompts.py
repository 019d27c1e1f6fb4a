"""Prompt bank rows and seeded, order-independent sampling of scenes from a bank."""

from __future__ import annotations

from dataclasses import dataclass

from lyra_ops.seeding import derive_seed


@dataclass(frozen=True)
class SceneRecord:
    """One scene to generate: the row of the prompt bank it came from, with its derived seed."""

    scene_id: str
    text: str
    image_path: str | None
    content_sha: str
    seed: int
    source: str  # "procedural" | "images"

    def as_row(self) -> dict:
        return {
            "scene_id": self.scene_id,
            "text": self.text,
            "image_path": self.image_path,
            "content_sha": self.content_sha,
            "seed": self.seed,
            "source": self.source,
        }


def procedural_scene_id(index: int) -> str:
    return f"proc-{index:06d}"


def sample_records(candidates: list[SceneRecord], num_scenes: int, run_seed: int) -> list[SceneRecord]:
    """Pick ``num_scenes`` of ``candidates`` reproducibly: rank each by a hash of (run seed, scene id).

    The choice does not depend on the order candidates were listed in, nor on which worker asks, and the
    result is sorted by scene id.
    """
    ranked = sorted(candidates, key=lambda r: (derive_seed(run_seed, "pick", r.scene_id), r.scene_id))
    return sorted(ranked[:num_scenes], key=lambda r: r.scene_id)
