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


# Seeded prompt composition for large text-to-3D batches: scene type x style x lighting (x detail), deduplicated.
SCENE_TYPES = (
    "a cozy living room", "a modern kitchen", "a sunlit bedroom", "a library with tall bookshelves",
    "a small cafe interior", "a museum hall", "a greenhouse full of plants", "an artist's studio",
    "a quiet forest clearing", "a mountain lake shore", "a narrow cobblestone street", "a desert canyon",
    "a snowy village square", "a beach with rocks", "a japanese garden", "an old train station",
    "a workshop with tools", "a cathedral nave", "a rooftop terrace", "a botanical courtyard",
)  # fmt: skip
STYLES = ("photorealistic", "cinematic", "watercolor painting", "3d render", "film photograph",
          "stylized illustration", "isometric diorama", "oil painting")
LIGHTING = ("soft morning light", "golden hour", "overcast daylight", "warm indoor lamps", "blue hour",
            "dramatic side light", "bright noon sun", "candlelight")
DETAILS = ("", "wide angle", "highly detailed", "depth of field", "symmetrical composition", "rich textures")


def compose_prompts(count: int, seed: int) -> list[str]:
    """``count`` distinct prompts drawn reproducibly from the template grid (raises if more are asked than the
    grid holds: 20 x 8 x 8 x 6 = 7,680)."""
    import numpy as np

    grid = len(SCENE_TYPES) * len(STYLES) * len(LIGHTING) * len(DETAILS)
    if count > grid:
        raise ValueError(f"compose_prompts: {count} prompts asked, the template grid holds {grid}")
    rng = np.random.default_rng(derive_seed(seed, "compose-prompts"))
    picks = rng.choice(grid, size=count, replace=False)
    out = []
    for p in picks.tolist():
        p, d = divmod(p, len(DETAILS))
        p, li = divmod(p, len(LIGHTING))
        s, st = divmod(p, len(STYLES))
        parts = [SCENE_TYPES[s], STYLES[st], LIGHTING[li]] + ([DETAILS[d]] if DETAILS[d] else [])
        out.append(", ".join(parts))
    return out


def text_scene_id(index: int) -> str:
    return f"text-{index:06d}"
