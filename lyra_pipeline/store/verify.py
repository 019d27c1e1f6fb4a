"""``lyra verify``: check every chunk and table of every finished unit of a store, and mark damage for recompute.

What is checked, per scene (``--scene`` or all):

* its manifest file parses (else the scene's units are unknown: ``--repair`` removes the file and the next run
  recomputes the whole scene);
* every ``done`` unit's arrays (the groups its stage writes, :data:`UNIT_GROUPS`) exist, their metadata reads,
  every chunk file the chunk grid calls for is present, and each chunk's stored crc32c matches its bytes (store
  format 2; arrays written before checksums are decoded instead); the evaluate unit's table parses;

and at the store level ``store.json``, ``dataset.json``, ``prompts.parquet``, ``manifest_index.parquet``, the
evaluation tables and the run summaries. ``--repair`` turns each damaged unit's row into ``damaged`` (never
``done``: the next ``lyra run`` recomputes exactly those units, whose code is deterministic, so the store ends
bit-identical to an undamaged one), removes unreadable indexes and derived tables (rebuilt by the commands that
write them) and rebuilds ``prompts.parquet`` from the dataset record. Nothing is written without ``repair``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import numpy as np
import zarr

from lyra_ops.errors import LyraStorageError
from lyra_pipeline.store.runstore import (
    MANIFEST_INDEX,
    ManifestRow,
    RunStore,
    _short,
    is_checksummed,
    validate_scene_id,
)

# The groups (or arrays) each stage writes, relative to the scene group ({t}: the trajectory) ...
UNIT_GROUPS = {
    "input": ("input",), "depth": ("depth",), "cameras": ("trajectories/{t}/cameras",),
    "warp": ("trajectories/{t}/warp",), "refine": ("trajectories/{t}/refine",),
    "generate": ("trajectories/{t}/teacher",), "latents": ("trajectories/{t}/latents",),
    "video_depth": ("trajectories/{t}/video_depth",),
}
# ... and the arrays a finished unit always has (a deleted array is damage, not an empty group).
REQUIRED = {
    "input": ("input/rgb", "input/K"), "depth": ("depth/depth", "depth/reliable"),
    "cameras": ("trajectories/{t}/cameras/c2w", "trajectories/{t}/cameras/K"),
    "warp": ("trajectories/{t}/warp/rgb", "trajectories/{t}/warp/depth", "trajectories/{t}/warp/mask"),
    "refine": ("trajectories/{t}/refine/mask",), "generate": ("trajectories/{t}/teacher/rgb",),
    "latents": ("trajectories/{t}/latents",), "video_depth": ("trajectories/{t}/video_depth/depth",),
}
DAMAGED = "damaged"
READ_BATCH = 64  # chunk files fetched per request batch (object stores fetch them concurrently)


@dataclass(frozen=True)
class Damage:
    """One damaged thing: a chunk, an array, or a table/file. ``unit`` (scene, trajectory, stage) when it
    belongs to a finished unit."""

    path: str  # store-relative path of the array, table or file
    chunk: str  # chunk key ('' for whole arrays and files)
    expected: str
    found: str
    unit: tuple[str, str, str] | None = None

    def line(self) -> str:
        where = f"{self.path}, chunk {self.chunk}" if self.chunk else self.path
        unit = f" [unit {self.unit[0]} {self.unit[1] or '-'} {self.unit[2]}]" if self.unit else ""
        return f"{where}: expected {self.expected}, found {self.found}{unit}"


@dataclass
class VerifyReport:
    store: str
    scenes: int = 0
    units: int = 0
    arrays: int = 0
    unchecksummed_arrays: int = 0  # written before store format 2: decoded, not crc-checked
    chunks: int = 0
    bytes: int = 0
    tables: int = 0
    seconds: float = 0.0
    damage: list[Damage] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)  # what --repair did, one line each
    unrepaired: list[str] = field(default_factory=list)  # damage --repair could not fix, one line each
    keys: dict[tuple[str, str, str], str] = field(default_factory=dict)  # each checked unit's content key
    skipped_leased: list[str] = field(default_factory=list)  # scenes a live run holds (not repaired)

    @property
    def damaged_units(self) -> set[tuple[str, str, str]]:
        return {d.unit for d in self.damage if d.unit is not None}

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        return {"store": self.store, "scenes": self.scenes, "units": self.units, "arrays": self.arrays,
                "unchecksummed_arrays": self.unchecksummed_arrays, "chunks": self.chunks, "bytes": self.bytes,
                "tables": self.tables, "seconds": self.seconds, "mb_per_s": self.mb_per_s,
                "damage": [d.line() for d in self.damage], "damaged_units": sorted(map(list, self.damaged_units)),
                "repaired": self.repaired, "unrepaired": self.unrepaired, "skipped_leased": self.skipped_leased}


def crc_ok(data: bytes) -> tuple[bool, str, str]:
    """Whether a crc32c-coded chunk's last 4 bytes are the crc32c of the rest (little endian, as Zarr writes
    it); and the expected / found checksums as hex."""
    if len(data) < 4:
        return False, "a chunk of >= 4 bytes", f"{len(data)} bytes"
    stored = bytes(data[-4:])
    computed = np.uint32(google_crc32c.value(bytes(data[:-4]))).tobytes()
    return stored == computed, f"crc32c {computed.hex()}", f"crc32c {stored.hex()}"


def _unit_paths(patterns: Iterable[str], trajectory: str) -> list[str]:
    return [p.format(t=trajectory) for p in patterns]


class Verifier:
    """Checks one store; ``log`` gets a line per damaged thing as it is found."""

    def __init__(self, store: RunStore, log: Callable[[str], None] | None = None) -> None:
        self.store, self.log = store, log or (lambda _: None)
        self.report = VerifyReport(store.url)
        self._present: dict[str, set[str]] = {}  # chunk files of the scene being checked (one listing)

    def _damage(self, d: Damage) -> None:
        self.report.damage.append(d)
        self.log(d.line())

    # --- tables and files -------------------------------------------------------------------------------------
    def check_parquet(self, rel: str, unit: tuple[str, str, str] | None = None, required: bool = False) -> bool:
        data = self.store.read_file(rel)
        if data is None:
            if required:
                self._damage(Damage(rel, "", "the file", "nothing", unit))
            return not required
        self.report.tables += 1
        self.report.bytes += len(data)
        try:
            self.store.parse_parquet(data, rel)
        except LyraStorageError as exc:
            self._damage(Damage(rel, "", "a readable Parquet file", str(exc).split("(", 1)[-1].split(")")[0], unit))
            return False
        return True

    def check_json(self, rel: str) -> bool:
        data = self.store.read_file(rel)
        if data is None:
            return True
        self.report.tables += 1
        self.report.bytes += len(data)
        try:
            json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            self._damage(Damage(rel, "", "readable JSON", _short(exc)))
            return False
        return True

    def check_store_files(self) -> None:
        for rel in ("dataset.json",):
            self.check_json(rel)
        has_data = self.store.read_file("dataset.json") is not None or bool(self.store.list_names("manifest"))
        self.check_parquet("prompts.parquet", required=has_data)  # a store with data has a scene list
        self.check_parquet(MANIFEST_INDEX)
        for name in self.store.list_names("runs"):
            if name.endswith(".json"):
                self.check_json(f"runs/{name}")
        for rel in self._eval_tables(per_scene=False):
            self.check_parquet(rel)

    def _eval_tables(self, per_scene: bool) -> list[str]:
        """Evaluation tables: per-scene ones (``eval/<kind>/.../<scene>.parquet``) or the summaries."""
        out = []
        for name in self.store.list_names("eval"):
            if name.endswith(".parquet"):
                if not per_scene:
                    out.append(f"eval/{name}")
            elif per_scene:
                for sub in self.store.list_names(f"eval/{name}"):
                    if sub.endswith(".parquet"):
                        out.append(f"eval/{name}/{sub}")
                    else:
                        out += [f"eval/{name}/{sub}/{f}" for f in self.store.list_names(f"eval/{name}/{sub}")
                                if f.endswith(".parquet")]
        return out

    # --- arrays -------------------------------------------------------------------------------------------------
    def unit_arrays(self, scene_id: str, trajectory: str, stage: str,
                    unit: tuple[str, str, str]) -> dict[str, zarr.Array]:
        """The arrays a finished unit wrote (required ones that are missing are recorded as damage)."""
        arrays: dict[str, zarr.Array] = {}
        unreadable: list[str] = []
        try:  # opened, never created: verify writes nothing
            group = self.store.existing_scene_group(scene_id)
        except KeyError:
            group = None
            unreadable.append("")
            self._damage(Damage(f"scenes.zarr/{scene_id}", "", "the scene's Zarr group", "nothing", unit))
        except Exception as exc:  # noqa: BLE001 - unreadable zarr.json of the scene group
            group = None
            unreadable.append("")
            self._damage(Damage(f"scenes.zarr/{scene_id}", "", "readable Zarr metadata", _short(exc), unit))
        for prefix in _unit_paths(UNIT_GROUPS[stage], trajectory) if group is not None else []:
            try:
                node = group[prefix]
                members = [(prefix, node)] if isinstance(node, zarr.Array) else \
                    [(f"{prefix}/{path}", m) for path, m in node.members(max_depth=None)]
            except KeyError:
                continue  # reported below if a required array lives there
            except Exception as exc:  # noqa: BLE001 - unreadable zarr.json
                unreadable.append(prefix)
                self._damage(Damage(f"scenes.zarr/{scene_id}/{prefix}", "", "readable Zarr metadata", _short(exc),
                                    unit))
                continue
            arrays.update((name, m) for name, m in members if isinstance(m, zarr.Array))
        for name in _unit_paths(REQUIRED[stage], trajectory):
            if name not in arrays and not any(name.startswith(p) for p in unreadable):
                self._damage(Damage(f"scenes.zarr/{scene_id}/{name}", "", "the array", "nothing", unit))
        return arrays

    def check_array(self, scene_id: str, name: str, arr: zarr.Array, unit: tuple[str, str, str]) -> bool:
        """Every chunk of one array: present, and its checksum right (or, unchecksummed, decodable)."""
        self.report.arrays += 1
        rel = f"scenes.zarr/{scene_id}/{name}"
        keys = RunStore.chunk_keys(arr)
        if not is_checksummed(arr):
            self.report.unchecksummed_arrays += 1
            try:
                arr[...]
                self.report.chunks += len(keys)
                self.report.bytes += arr.nbytes
                return True
            except Exception as exc:  # noqa: BLE001 - zstd/numcodecs errors
                key, why = RunStore.find_bad_chunk(arr, exc)
                self._damage(Damage(rel, key, "a decodable chunk", why, unit))
                return False
        present = self._present.get(name, set())
        ok = True
        for key in keys:
            if key not in present:
                self._damage(Damage(rel, key, "the chunk file", "nothing", unit))
                ok = False
        wanted = [k for k in keys if k in present]
        for lo in range(0, len(wanted), READ_BATCH):
            batch = wanted[lo:lo + READ_BATCH]
            paths = [self.store.array_path(scene_id, name, k) for k in batch]
            blobs = self.store.fs.cat(paths, on_error="return")
            for key, path in zip(batch, paths, strict=True):
                data = blobs.get(path)
                if data is None:  # some filesystems key the result without the protocol or leading slash
                    data = next((v for p, v in blobs.items() if str(p).endswith(path.lstrip("/"))), None)
                if isinstance(data, BaseException) or data is None:
                    self._damage(Damage(rel, key, "a readable chunk file", _short(data) if data else "nothing",
                                        unit))
                    ok = False
                    continue
                self.report.chunks += 1
                self.report.bytes += len(data)
                good, expected, found = crc_ok(data)
                if not good:
                    self._damage(Damage(rel, key, expected, found, unit))
                    ok = False
        return ok

    # --- scenes -------------------------------------------------------------------------------------------------
    def check_scene(self, scene_id: str) -> None:
        self.report.scenes += 1
        rel = f"manifest/{validate_scene_id(scene_id)}.parquet"
        if not self.check_parquet(rel, unit=None):
            return  # units unknown: the repair recomputes the scene
        self.store.forget_manifest(scene_id)
        rows = self.store.scene_manifest(scene_id)
        self._present = self.store.chunk_files(scene_id)
        for (trajectory, stage), row in sorted(rows.items()):
            if row.status != "done":
                continue
            unit = (scene_id, trajectory, stage)
            self.report.units += 1
            self.report.keys[unit] = row.key
            if stage == "evaluate":
                self.check_parquet(f"eval/frames/{scene_id}.parquet", unit, required=True)
                continue
            if stage not in UNIT_GROUPS:
                continue
            for name, arr in sorted(self.unit_arrays(scene_id, trajectory, stage, unit).items()):
                self.check_array(scene_id, name, arr, unit)

    def scenes(self, only: list[str] | None) -> list[str]:
        """Scenes to check: ``only``, else every scene with a manifest file or a Zarr group."""
        if only:
            return [validate_scene_id(s) for s in only]
        names = {n.removesuffix(".parquet") for n in self.store.list_names("manifest") if n.endswith(".parquet")}
        try:
            names |= set(self.store.scene_ids())
        except Exception as exc:  # noqa: BLE001 - an unreadable root group
            self._damage(Damage("scenes.zarr", "", "readable Zarr metadata", _short(exc)))
        return sorted(names)

    def run(self, only: list[str] | None = None) -> VerifyReport:
        t0 = time.perf_counter()
        if not only:
            self.check_store_files()
        for scene_id in self.scenes(only):
            self.check_scene(scene_id)
        for rel in self._eval_tables(per_scene=True):
            scene = rel.rsplit("/", 1)[-1].removesuffix(".parquet")
            if rel.startswith("eval/frames/") or (only and scene not in only):
                continue  # frames tables belong to the evaluate units, checked with their scene
            self.check_parquet(rel)
        self.report.seconds = time.perf_counter() - t0
        return self.report


def verify_store(store: RunStore, scenes: list[str] | None = None, *, repair: bool = False,
                 log: Callable[[str], None] | None = None) -> VerifyReport:
    """Check ``store`` (every scene, or ``scenes``); with ``repair`` mark what is damaged for recompute."""
    report = Verifier(store, log).run(scenes)
    if repair and report.damage:
        repair_store(store, report)
    return report


def repair_store(store: RunStore, report: VerifyReport) -> None:
    """Make the damage of ``report`` recomputable: damaged units' rows become ``damaged`` (the next ``lyra run``
    recomputes exactly those), an unreadable manifest file is removed (its scene is recomputed whole), unreadable
    indexes, derived tables and run summaries are removed (rebuilt by the commands that write them), and an
    unreadable scene list is rebuilt from the dataset record. Scenes a live run holds are skipped."""
    from lyra_pipeline.stages import SceneLease, lease_owner

    by_scene: dict[str, list[Damage]] = {}
    files: list[Damage] = []
    for d in report.damage:
        if d.unit is not None:
            by_scene.setdefault(d.unit[0], []).append(d)
        elif d.path.startswith("manifest/") and d.path != MANIFEST_INDEX:
            by_scene.setdefault(d.path.split("/", 1)[1].removesuffix(".parquet"), []).append(d)
        else:
            files.append(d)
    owner = lease_owner("verify")
    for scene_id, damage in sorted(by_scene.items()):
        lease = SceneLease(store, scene_id, owner)
        try:
            lease.acquire(timeout_s=5.0)
        except LyraStorageError:
            report.skipped_leased.append(scene_id)
            continue
        try:
            if any(d.unit is None for d in damage):  # the manifest itself: the scene's units are unknown
                store.remove_tree(f"manifest/{scene_id}.parquet")
                store.forget_manifest(scene_id)
                report.repaired.append(f"removed manifest/{scene_id}.parquet: {scene_id} is recomputed whole")
                continue
            store.forget_manifest(scene_id)
            current = store.scene_manifest(scene_id)
            rows = []
            for unit in sorted({d.unit for d in damage}):
                old = current.get((unit[1], unit[2]))
                if old is None or old.status != "done" or old.key != report.keys.get(unit):
                    continue  # rewritten since it was checked (a live run): not this damage any more
                why = "; ".join(d.line() for d in damage if d.unit == unit)[:2000]
                rows.append(ManifestRow(scene_id, unit[1], unit[2], DAMAGED, old.key, old.duration_s,
                                        f"verify: {why}", old.run_id))
                if unit[2] == "evaluate":
                    store.remove_tree(f"eval/frames/{scene_id}.parquet")
                else:  # the unit's groups go: its recompute starts clean (no resume state such as a long path's
                    # clips_done, no damaged group metadata that Zarr would keep)
                    for prefix in _unit_paths(UNIT_GROUPS[unit[2]], unit[1]):
                        store.remove_tree(f"scenes.zarr/{scene_id}/{prefix}")
            store.record(rows)
            report.repaired += [f"marked {r.scene_id} {r.trajectory or '-'} {r.stage} for recompute" for r in rows]
        finally:
            lease.release()
    order = {"prompts.parquet": 0, "dataset.json": 1}  # the scene list first: the dataset record counts it
    for d in sorted(files, key=lambda d: order.get(d.path, 2)):
        line = _repair_file(store, d)
        (report.unrepaired if "not repairable" in line else report.repaired).append(line)
    if any(d.path.startswith("manifest/") or d.unit for d in report.damage) and \
            not any(d.path == MANIFEST_INDEX for d in files):
        store.compact_manifest()  # the index reflects the new rows at once


def _repair_file(store: RunStore, d: Damage) -> str:
    if d.path == "prompts.parquet":
        from lyra_pipeline.store.dataset import read_dataset

        dataset = read_dataset(store)
        if dataset is not None:
            from lyra_pipeline.planning import scene_records

            store.write_prompts([r.as_row() for r in scene_records(dataset.config())])
            return "rebuilt prompts.parquet from dataset.json"
        rows = [dict(store.scene_group(s).attrs) for s in store.scene_ids()]
        store.write_prompts([{k: r.get(k) for k in ("scene_id", "text", "image_path", "content_sha", "seed",
                                                    "source")} for r in rows if "scene_id" in r])
        return "rebuilt prompts.parquet from the scene groups' attributes"
    if d.path == "dataset.json":
        runs = [r for r in store.run_summaries() if "overrides" in r]
        if runs:
            from lyra_pipeline.store.dataset import DATASET_FILE, dataset_doc

            store.write_file(DATASET_FILE, dataset_doc(runs[-1]["preset"], runs[-1]["overrides"],
                                                       store.prompt_count()))
            return f"rebuilt dataset.json from run {runs[-1]['run_id']}"
        return "dataset.json: not repairable here (no run summary records the dataset); remove it and pass the " \
               "--preset / --config the store was made with"
    if d.path == "scenes.zarr":
        return "scenes.zarr/zarr.json: not repairable here"
    store.remove_tree(d.path)  # an index, a derived table or a run summary: rebuilt by the command that writes it
    return f"removed {d.path} (rebuilt by the command that writes it)"

