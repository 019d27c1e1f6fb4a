"""The dataset a store was made for, and the config every command on that store uses.

``lyra run`` records, beside the scene list (``prompts.parquet``), how that list was made: ``dataset.json`` holds
the preset and the overrides (config file, ``--images``, ``--trajectory``, ``--video``, ``--seed`` ...) of the
dataset. A command on an existing store starts from that record and applies only what the user gives on top
(sections such as ``mask`` or ``generator`` may change: their stages are recomputed under new content keys).
An override that changes which scenes exist is refused in one line naming the store's value and the given one,
before anything is written; only ``lyra run`` may grow the list (new scenes after the recorded ones).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lyra_ops.errors import LyraConfigError, LyraStorageError
from lyra_pipeline.config import RunConfig, build_config, merge

if TYPE_CHECKING:
    from lyra_ops.prompts import SceneRecord
    from lyra_pipeline.store.runstore import RunStore

DATASET_FILE = "dataset.json"
DEFAULT_PRESET = "default"
MAX_SCENES = 1_000_000  # planning lists every scene (ids, seeds, content hashes): beyond this, split the dataset
# sections that say how to compute, not what: never recorded (a --gpus run must not pin later runs to CUDA)
UNRECORDED = ("compute",)
SCENE_FIELDS = ("scene_id", "content_sha", "seed", "source")
PROMPT_FIELDS = ("scene_id", "text", "image_path", "content_sha", "seed", "source")


@dataclass(frozen=True)
class Dataset:
    """What ``dataset.json`` records: the preset and overrides that give the store's scene list."""

    preset: str
    overrides: dict[str, Any]
    scenes: int

    def config(self) -> RunConfig:
        return build_config(self.preset, self.overrides, source=DATASET_FILE)


@dataclass(frozen=True)
class Binding:
    """The config of one command on a store: its preset name, overrides and resolved config, the scene list it
    gives, and whether that list is new to the store (a new store, or ``run`` growing the list)."""

    preset: str
    overrides: dict[str, Any]
    config: RunConfig
    records: list[SceneRecord]
    stored: Dataset | None
    grows: bool = False


def read_dataset(store: RunStore) -> Dataset | None:
    """The store's dataset record, or None (a new store, or one made before datasets were recorded)."""
    data = store.read_file(DATASET_FILE)
    if data is None:
        return None
    try:
        doc = json.loads(data)
        return Dataset(str(doc["preset"]), dict(doc["overrides"]), int(doc.get("scenes", 0)))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise LyraStorageError(f"{store.url}/{DATASET_FILE}: not a readable dataset record; the store is damaged: "
                               f"`lyra verify --store {store.url} --repair`") from None


def dataset_doc(preset: str, overrides: dict[str, Any], scenes: int) -> bytes:
    kept = {k: v for k, v in overrides.items() if k not in UNRECORDED}
    return json.dumps({"preset": preset, "overrides": kept, "scenes": scenes}, indent=2, sort_keys=True).encode()


def record_dataset(store: RunStore, preset: str, overrides: dict[str, Any], records: list[SceneRecord]) -> None:
    """Write the scene list and its dataset record (``lyra run`` only; each rewritten only when it changed).
    The record goes first: a scene list is never on disk without the config that made it."""
    doc = dataset_doc(preset, overrides, len(records))
    if store.read_file(DATASET_FILE) != doc:
        store.write_file(DATASET_FILE, doc)
    store.write_prompts([r.as_row() for r in records])


def describe(preset: str, config: RunConfig, scenes: int) -> str:
    """``preset default: 6 procedural scenes, seed 0`` (what a refusal names)."""
    s = config.scenes
    where = {"images": f" from {s.images_dir}", "video": f" from {s.video_path}"}.get(s.source, "")
    return f"preset {preset}: {scenes} {s.source} scene{'s' if scenes != 1 else ''}{where}, seed {config.seed}"


def check_scene_count(config: RunConfig) -> None:
    if config.scenes.num_scenes > MAX_SCENES:
        raise LyraConfigError(f"scenes.num_scenes: {config.scenes.num_scenes} is more than {MAX_SCENES} scenes per "
                              "store (a run plans every scene's id, seed and content hash up front); split the "
                              "dataset over several stores")


def bind(store: RunStore | None, preset: str | None, overrides: dict[str, Any], *, command: str,
         default_preset: str = DEFAULT_PRESET, plan: Callable[[RunConfig], list[SceneRecord]] | None = None,
         ) -> Binding:
    """The config of ``command`` on ``store`` (None: no store there yet) given the user's ``preset`` (None: not
    given; a new store then gets ``default_preset``) and ``overrides``. On an existing store the recorded dataset
    is the base; the scene list the result gives (``plan(config)``, default ``scene_records``) must be the
    store's, except that ``run`` given ``scenes.num_scenes`` (``--num-scenes``) may add scenes (every recorded
    one kept as it is). Other commands that change nothing about the scenes take the list as recorded in
    ``prompts.parquet`` (inputs outside the store are not re-read). Raises ``LyraConfigError`` (nothing
    written)."""
    from lyra_pipeline.planning import scene_records

    stored = read_dataset(store) if store is not None else None
    if stored is not None:
        name = preset or stored.preset
        over = merge(stored.overrides, overrides)
    else:
        name, over = preset or default_preset, overrides
    config = build_config(name, over, source="command line" if stored is None else f"{DATASET_FILE} + options")
    check_scene_count(config)
    rows = store.read_prompts() if store is not None else []
    same_scenes = stored is not None and "scenes" not in overrides and "seed" not in overrides \
        and name == stored.preset
    if rows and same_scenes and command != "run":
        # the store's own scene list, as recorded: no image folder re-scanned, no prompts file or video re-read (a
        # store moved to another machine, or whose inputs moved, still works)
        from lyra_ops.prompts import SceneRecord

        return Binding(name, over, config, [SceneRecord(**{k: r[k] for k in PROMPT_FIELDS}) for r in rows], stored)
    records = (plan or scene_records)(config)
    if not rows and stored is not None:  # the scene list is missing but the dataset is not: compare with it
        rows = [r.as_row() for r in scene_records(stored.config())]
    if not rows:  # a new store (or one without a scene list yet): this command's list is the dataset
        return Binding(name, over, config, records, stored, grows=True)
    have = [tuple(r[f] for f in SCENE_FIELDS) for r in rows]
    want = [tuple(getattr(r, f) for f in SCENE_FIELDS) for r in records]
    if want == have:
        return Binding(name, over, config, records, stored)
    if command == "run" and "num_scenes" in (overrides.get("scenes") or {}) and set(have) <= set(want):
        return Binding(name, over, config, records, stored, grows=True)  # asked for: more scenes, the old ones kept
    store_desc = describe(stored.preset, stored.config(), len(rows)) if stored is not None else \
        f"{len(rows)} {rows[0]['source']} scenes ({rows[0]['scene_id']} ...)"
    differ = next((i for i, (a, b) in enumerate(zip(have, want, strict=False)) if a != b), min(len(have), len(want)))
    detail = (f"scene {have[differ][0]} differs" if differ < min(len(have), len(want)) else
              f"{len(want)} scenes instead of {len(have)}")
    hint = ("drop the options that change the scene list (--preset, --num-scenes, --seed, --images, scenes.*) to "
            "use the store's" if stored is not None else
            "this store predates dataset records: give the --preset / --config / --images it was made with")
    raise LyraConfigError(f"{store.url} holds {store_desc}; this {command} gives {describe(name, config, len(want))} "
                          f"({detail}): a command cannot change a store's scene list; {hint}, or use another --store")
