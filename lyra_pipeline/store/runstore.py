"""The run store: the ONLY module that knows paths, Zarr groups and Parquet tables (see storage_layout.md).

A store is a folder (local path or any fsspec URL) holding:

* ``store.json``                     format marker and version
* ``prompts.parquet``                the scene list of the run(s): scene_id, text, image_path, seed, ...
* ``scenes.zarr/<scene_id>/...``     Zarr v3 group per scene with every array the stages write
* ``manifest/<scene_id>.parquet``    one row per (scene, trajectory, stage): status, content key, timing, error
* ``runs/<run_id>.json``             what each run computed, reused and failed

Data are written first; a stage is recorded ``done`` under its content key only after its arrays are complete,
so a crash leaves at most a ``running`` row whose data the next run rewrites.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import Crc32cCodec, ZstdCodec

from lyra_ops.errors import LyraInputError, LyraStorageError
from lyra_pipeline.store import interrupt
from lyra_pipeline.store.names import (  # noqa: F401 - re-exported (lyra_pipeline.store)
    ALL_STAGES,
    EVAL_STAGES,
    SCENE_STAGES,
    STAGES,
    TRAJECTORY_STAGES,
)

STORE_FORMAT = "lyra-store"
MANIFEST_INDEX = "manifest_index.parquet"
# The index records the manifest folder's mtime once the folder has been quiet this long (longer than any file
# system's timestamp granularity), for stores of at least this many scenes (smaller ones are listed: cheap).
INDEX_QUIET_S = 2.0
INDEX_QUIET_MIN_SCENES = 10_000
INDEX_ROW_GROUP = 1 << 16
STORE_VERSION = 2  # 2: every array chunk carries a crc32c checksum and every chunk is written (empty ones too)
# zstd as before, then a crc32c of the compressed bytes (Zarr v3 codec): a flipped bit, a torn or foreign chunk fails
# its read with the chunk named (and ``lyra verify`` checks it without decompressing)
CHUNK_COMPRESSORS = (ZstdCodec(level=0, checksum=False), Crc32cCodec())
# chunks equal to the fill value are written too, so a chunk file that is missing is damage, never zeros
zarr.config.set({"array.write_empty_chunks": True})
SCENE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

MANIFEST_SCHEMA = pa.schema(
    [
        ("scene_id", pa.string()),
        ("trajectory", pa.string()),  # "" for scene-level stages
        ("stage", pa.string()),
        ("status", pa.string()),  # running | done | failed
        ("key", pa.string()),
        ("duration_s", pa.float64()),
        ("error", pa.string()),
        ("run_id", pa.string()),
        ("updated_at", pa.float64()),
    ]
)
PROMPT_SCHEMA = pa.schema(
    [
        ("scene_id", pa.string()),
        ("text", pa.string()),
        ("image_path", pa.string()),  # null for procedural scenes
        ("content_sha", pa.string()),  # sha256 of the image bytes, or of the procedural scene recipe
        ("seed", pa.int64()),
        ("source", pa.string()),  # procedural | images
    ]
)


def validate_scene_id(scene_id: str, *, source: str = "scene id") -> str:
    """Scene ids name folders and files: plain ASCII names only, never paths."""
    if not isinstance(scene_id, str) or not SCENE_ID_RE.match(scene_id) or ".." in scene_id:
        raise LyraInputError(
            f"{source}: invalid scene id {scene_id!r}; expected 1-128 characters from [A-Za-z0-9_.-], "
            "starting with a letter or digit, without '..' or '/'"
        )
    return scene_id


def content_key(stage: str, version: int, params: dict[str, Any], inputs: dict[str, str]) -> str:
    """Content hash of a stage: its name and code version, its config section, its inputs' keys."""
    blob = json.dumps(
        {"stage": stage, "version": version, "params": params, "inputs": inputs}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class ManifestRow:
    scene_id: str
    trajectory: str
    stage: str
    status: str
    key: str
    duration_s: float = 0.0
    error: str = ""
    run_id: str = ""
    updated_at: float = field(default_factory=time.time)


def is_checksummed(arr: zarr.Array) -> bool:
    """Whether an array carries per-chunk crc32c checksums (store format 2; older arrays have none, and may lack
    chunks that equalled the fill value)."""
    return any(isinstance(c, Crc32cCodec) for c in arr.metadata.codecs)


def _short(exc: BaseException) -> str:
    """One line for a decoding error: its type and first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300]


def _same_table(old: bytes, table: pa.Table, check_metadata: bool = False) -> bool:
    """Whether Parquet bytes ``old`` hold ``table`` (unreadable bytes: no, so they are rewritten)."""
    try:
        return pq.read_table(io.BytesIO(old)).equals(table, check_metadata=check_metadata)
    except (pa.ArrowException, OSError, ValueError):
        return False


def _unit_counts(table: pa.Table) -> Counter[tuple[str, str, str]]:
    """Rows of a manifest table per (trajectory, stage, status), computed in Arrow."""
    if table.num_rows == 0:
        return Counter()
    agg = table.group_by(["trajectory", "stage", "status"]).aggregate([("scene_id", "count")])
    return Counter(dict(zip(zip(agg["trajectory"].to_pylist(), agg["stage"].to_pylist(), agg["status"].to_pylist(),
                                strict=True), agg["scene_id_count"].to_pylist(), strict=True)))


def _mtime(info: dict[str, Any]) -> float:
    """Modification time (unix seconds) of an fsspec listing entry (local: mtime; S3: LastModified)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return math.inf  # unknown: always re-read


def check_store_url(url: str | os.PathLike[str]) -> str:
    """A store URL: a non-empty local path or fsspec URL (an empty one would write a store into the current
    folder)."""
    text = str(url) if url is not None else ""
    if not text.strip():
        raise LyraInputError("--store: empty store URL; expected a local path (e.g. ./lyra_store) or an fsspec URL "
                             "(s3://bucket/prefix)")
    return text


def store_exists(url: str | os.PathLike[str]) -> bool:
    """Whether a lyra store (its ``store.json``) exists at ``url``; reads nothing else and writes nothing."""
    try:
        fs, root = fsspec.core.url_to_fs(check_store_url(url))
        return bool(fs.exists(root.rstrip("/") + "/store.json"))
    except LyraInputError:
        raise
    except Exception:  # noqa: BLE001 - unreachable: RunStore() then says why
        return False


class RunStore:
    """A run store at a local path or fsspec URL (``s3://``, ``memory://``, ...)."""

    def __init__(self, url: str | os.PathLike[str], *, create: bool = True) -> None:
        self.url = check_store_url(url)
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url)
        except Exception as exc:  # noqa: BLE001 - unknown protocol, missing driver...
            raise LyraStorageError(f"store {self.url!r}: cannot open ({exc})") from exc
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        # S3 (and S3-compatible servers) honour If-None-Match / If-Match on PUT: leases are claimed atomically.
        self.conditional_puts = bool(protocols & {"s3", "s3a"})
        self._manifest_cache: dict[str, dict[tuple[str, str], ManifestRow]] = {}
        self._groups: dict[str, zarr.Group] = {}
        marker = self._path("store.json")
        hint = ("" if self.is_local else "; check the URL, that the bucket exists, and the credentials (taken only "
                "from the standard environment / config files of the filesystem, e.g. AWS_* variables)")
        try:
            exists = self.fs.exists(marker)
            meta = json.loads(self.fs.cat_file(marker)) if exists else None
        except Exception as exc:  # noqa: BLE001 - permission, network, missing bucket, bad credentials...
            raise LyraStorageError(f"store {self.url!r}: cannot read ({type(exc).__name__}: {exc}){hint}") from None
        if meta is not None:
            if meta.get("format") != STORE_FORMAT:
                raise LyraStorageError(f"{self.url}: store.json does not describe a {STORE_FORMAT} store")
        elif create:
            try:
                if self.is_local:  # object stores have no folders (and makedirs would create a missing bucket)
                    self.fs.makedirs(self.root, exist_ok=True)
                self._write_bytes("store.json", json.dumps({"format": STORE_FORMAT, "version": STORE_VERSION})
                                  .encode())
            except Exception as exc:  # noqa: BLE001 - read-only folder, missing bucket, denied...
                raise LyraStorageError(f"store {self.url!r}: cannot write ({type(exc).__name__}: {exc}){hint}") \
                    from None
        else:
            raise LyraStorageError(f"{self.url}: not a lyra store (no store.json)")
        self._zroot = self._open_root()

    def _open_root(self, attempts: int = 20) -> zarr.Group:
        """The root Zarr group, created if missing. Two processes opening a new store at once race here: one
        creates ``scenes.zarr`` while the other finds it half made (zarr raises "nothing found at path ''"), so
        a failed open is retried after a short pause before the error is raised."""
        for attempt in range(attempts - 1):
            try:
                return zarr.open_group(store=self._zarr_store(), mode="a")
            except Exception:  # noqa: BLE001 - zarr raises several types for a half-made group
                time.sleep(0.05 * (attempt + 1))
        return zarr.open_group(store=self._zarr_store(), mode="a")

    def check_writable(self) -> None:
        """Write and remove a probe file, so a read-only store fails before any work rather than mid-run."""
        rel = f"probe-{uuid.uuid4().hex}.tmp"
        try:
            self._write_bytes(rel, b"lyra write probe", durable=False)
            self.fs.rm_file(self._path(rel))
        except Exception as exc:  # noqa: BLE001 - permission, read-only filesystem, denied PUT...
            raise LyraStorageError(f"store {self.url!r} is read-only or denies writes ({type(exc).__name__}: {exc}); "
                                   "use a writable store URL, or credentials allowed to write there") from None

    # --- paths and raw bytes ----------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _zarr_store(self) -> zarr.abc.store.Store:
        if self.is_local:
            return zarr.storage.LocalStore(self._path("scenes.zarr"))
        return zarr.storage.FsspecStore.from_url(self.url.rstrip("/") + "/scenes.zarr")

    def _write_bytes(self, rel: str, data: bytes, *, durable: bool = True) -> None:
        """Atomic write: temp file + rename locally (fsync'd unless ``durable`` is False: leases need atomicity,
        not durability); object stores publish a PUT atomically."""
        path = self._path(rel)
        if self.is_local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def _read_bytes(self, rel: str) -> bytes | None:
        path = self._path(rel)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def clean_partial_files(self, scene_id: str | None = None) -> int:
        """Remove temporary files a killed writer may have left (``*.tmp`` here, ``*.partial`` from Zarr).

        Without ``scene_id``: the store-level files (manifests, run summaries, training, leases), a walk that
        stays small at any number of scenes. With it: that scene's array chunks, which a run taking over the
        stale lease of a killed writer removes before writing the scene (a lease released normally leaves none;
        only unfinished scenes can hold them, and those get processed)."""
        if not self.is_local:
            return 0
        if scene_id is not None:
            patterns = [f"scenes.zarr/{validate_scene_id(scene_id)}/**/*.partial"]
        else:
            patterns = ["manifest/*.tmp", "*.tmp", "runs/*.tmp", "train/**/*.tmp", "leases/*.tmp", "cache/**/*.tmp",
                        "scenes.zarr/*.partial"]
        removed = 0
        for pattern in patterns:
            for p in Path(self.root).glob(pattern):
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    # --- prompts --------------------------------------------------------------------------------------------
    def write_prompts(self, rows: list[dict[str, Any]]) -> bool:
        """Record the scene list; rewrites nothing when it is unchanged. Returns True if written."""
        return self._write_parquet_if_changed("prompts.parquet", pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA))

    def prompt_count(self) -> int:
        """Number of scenes in the recorded scene list (from the Parquet footer, without reading the rows)."""
        data = self._read_bytes("prompts.parquet")
        return 0 if data is None else self.parse_parquet(data, "prompts.parquet", rows_only=True).num_rows

    def read_prompts(self) -> list[dict[str, Any]]:
        data = self._read_bytes("prompts.parquet")
        if data is None:
            return []
        return self.parse_parquet(data, "prompts.parquet").to_pylist()

    # --- manifest -------------------------------------------------------------------------------------------
    def _manifest_rel(self, scene_id: str) -> str:
        return f"manifest/{validate_scene_id(scene_id)}.parquet"

    def scene_manifest(self, scene_id: str) -> dict[tuple[str, str], ManifestRow]:
        """Rows of one scene keyed by (trajectory, stage); cached per process (one writer per scene)."""
        if scene_id not in self._manifest_cache:
            data = self._read_bytes(self._manifest_rel(scene_id))
            rows = self.parse_parquet(data, self._manifest_rel(scene_id)).to_pylist() if data is not None else []
            self._manifest_cache[scene_id] = {
                (r["trajectory"], r["stage"]): ManifestRow(**r) for r in rows
            }
        return self._manifest_cache[scene_id]

    def forget_manifest(self, scene_id: str) -> None:
        """Drop the cached manifest of a scene (re-read it: another process may have written it)."""
        self._manifest_cache.pop(scene_id, None)

    def is_done(self, scene_id: str, trajectory: str, stage: str, key: str) -> bool:
        row = self.scene_manifest(scene_id).get((trajectory, stage))
        return row is not None and row.status == "done" and row.key == key

    def record(self, rows: Iterable[ManifestRow], *, durable: bool = True, force: bool = False) -> None:
        """Upsert manifest rows (all of one scene) and write that scene's manifest file atomically (fsync'd
        unless ``durable`` is False: a ``running`` row only informs, a lost one changes nothing). Once an
        interrupt froze this process's writes (:mod:`.interrupt`) nothing is written unless ``force``."""
        with interrupt.LOCK:
            if force or interrupt.writes_allowed():
                self._record(list(rows), durable)

    def _record(self, rows: list[ManifestRow], durable: bool) -> None:
        if not rows:
            return
        scene_id = rows[0].scene_id
        current = self.scene_manifest(scene_id)
        for r in rows:
            if r.scene_id != scene_id:
                raise ValueError("record() takes rows of one scene at a time")
            current[(r.trajectory, r.stage)] = r
        ordered = sorted(current.values(), key=lambda r: (r.trajectory, ALL_STAGES.index(r.stage)
                                                           if r.stage in ALL_STAGES else 99))
        table = pa.table({f.name: [getattr(r, f.name) for r in ordered] for f in MANIFEST_SCHEMA},
                         schema=MANIFEST_SCHEMA)
        self._write_parquet(self._manifest_rel(scene_id), table, durable=durable)

    def mark_interrupted(self, run_ids: set[str], since: float) -> tuple[int, int]:
        """Rows of runs ``run_ids`` (manifest files changed after unix time ``since``): ``running`` ones become
        ``interrupted``. Returns (their done units, units now interrupted)."""
        path = self._path("manifest")
        if not self.fs.exists(path):
            return 0, 0
        done = interrupted = 0
        for name, mtime in sorted(self._listing_mtimes(path).items()):
            if mtime < since or name == MANIFEST_INDEX:
                continue
            scene_id = name.removesuffix(".parquet")
            self.forget_manifest(scene_id)
            rows = self.scene_manifest(scene_id)
            changed = []
            for row in rows.values():
                if row.run_id not in run_ids:
                    continue
                done += row.status == "done"
                if row.status == "running":
                    changed.append(ManifestRow(row.scene_id, row.trajectory, row.stage, "interrupted", row.key,
                                               row.duration_s, "interrupted (Ctrl-C / SIGTERM): redone by the next "
                                               "run", row.run_id))
            interrupted += len(changed)
            self.record(changed, force=True)
        return done, interrupted

    def release_leases_of(self, run_ids: set[str], pids: set[int]) -> None:
        """Remove the scene leases held by runs ``run_ids`` from this host in processes ``pids`` (this one and the
        children it stopped; lease owners are ``<run_id>:<host>:<pid>:<thread>``). Leases of workers elsewhere (a
        Dask cluster's) stay: those workers may still be writing, and their leases expire when they stop."""
        for name in self.list_names("leases"):
            if not name.endswith(".json"):
                continue
            lease = self.read_lease(name.removesuffix(".json"))
            if lease is not None and str(lease.get("owner", "")).split(":", 1)[0] in run_ids \
                    and lease.get("host") == os.uname().nodename and lease.get("pid") in pids:
                self.fs.rm_file(self._path("leases", name))

    def read_manifest(self, columns: list[str] | None = None, *, status: str | None = None) -> pa.Table:
        """All scenes' manifest rows as one table (empty table if nothing was recorded yet); ``status``: only the
        rows of that status (the index's row groups without it are skipped).

        Reads the compacted index (``manifest_index.parquet``) plus only the per-scene files written after it, so
        a finished store of 100k scenes answers from one file (see :meth:`compact_manifest`); when the manifest
        folder has not changed since the index (local stores), the folder is not even listed."""
        path = self._path("manifest")
        schema = MANIFEST_SCHEMA if columns is None else pa.schema([MANIFEST_SCHEMA.field(c) for c in columns])
        if not self.is_local:  # s3fs caches listings (per thread, indefinitely): other writers' files must show
            self.fs.invalidate_cache(self.root)
            self.fs.invalidate_cache(path)
        if not self.fs.exists(path):
            return schema.empty_table()
        cols = None if columns is None else sorted(set(columns) | {"scene_id"} | ({"status"} if status else set()))
        index, meta = self._manifest_index()
        fresh, stale = self._manifest_changes(path, meta)
        tables = [self._manifest_file(f, cols) for f in fresh]
        if status is not None:
            tables = [t.filter(pa.compute.equal(t["status"], status)) for t in tables]
        if index is not None:
            filters = [("status", "=", status)] if status is not None else None
            base = self.parse_parquet(index, MANIFEST_INDEX, columns=cols, filters=filters)
            base = base.replace_schema_metadata(None)
            if stale:  # rows of re-read or deleted scenes come from their files (or nowhere), not the index
                base = base.filter(pa.compute.invert(
                    pa.compute.is_in(base["scene_id"], value_set=pa.array(sorted(stale), pa.string()))))
            tables.insert(0, base)
        if not tables:
            return schema.empty_table()
        out = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
        return out if columns is None else out.select(columns)

    def _manifest_file(self, name: str, columns: list[str] | None) -> pa.Table:
        return self.parse_parquet(self.fs.cat_file(f"{self._path('manifest')}/{name}"), f"manifest/{name}",
                                  schema=MANIFEST_SCHEMA, columns=columns)

    def _manifest_index(self) -> tuple[bytes | None, dict[bytes, bytes]]:
        """The index file's bytes and its footer's key-value metadata (None, {} without an index)."""
        index = self._read_bytes(MANIFEST_INDEX)
        if index is None:
            return None, {}
        return index, dict(self.parse_parquet(index, MANIFEST_INDEX, rows_only=True).metadata or {})

    def _manifest_unchanged(self, path: str, meta: dict[bytes, bytes]) -> bool:
        """Whether no per-scene manifest file was written, replaced or removed since the index was made: the
        manifest folder's mtime is the one the index recorded (local stores; every write is a rename into the
        folder, which sets its mtime). One ``stat`` instead of listing (and stat-ing) every scene's file."""
        recorded = meta.get(b"listing_mtime_ns")
        if not self.is_local or recorded is None:
            return False
        try:
            return os.stat(path).st_mtime_ns == int(recorded)
        except (OSError, ValueError):
            return False

    def _manifest_changes(self, path: str, meta: dict[bytes, bytes]) -> tuple[list[str], set[str]]:
        """(per-scene files to read on top of the index, indexed scenes whose index rows are stale)."""
        if self._manifest_unchanged(path, meta):
            return [], set()
        listing = self._listing_mtimes(path)
        as_of = float(meta.get(b"as_of", b"-inf"))
        indexed = set(meta.get(b"scenes", b"").decode().split("\n")) - {""}
        fresh = sorted(f for f, m in listing.items() if m >= as_of or f.removesuffix(".parquet") not in indexed)
        present = {f.removesuffix(".parquet") for f in listing}
        stale = ({f.removesuffix(".parquet") for f in fresh} | (indexed - present)) & indexed
        return fresh, stale

    def done_keys(self) -> dict[tuple[str, str, str], str]:
        """(scene_id, trajectory, stage) -> key of every unit recorded ``done`` (reads 5 manifest columns)."""
        table = self.read_manifest(columns=["scene_id", "trajectory", "stage", "status", "key"]).to_pylist()
        return {(r["scene_id"], r["trajectory"], r["stage"]): r["key"] for r in table if r["status"] == "done"}

    def manifest_counts(self) -> dict[tuple[str, str], int]:
        """Units per (stage, status) (see :meth:`manifest_summary`)."""
        out: Counter[tuple[str, str]] = Counter()
        for (_, stage, status), n in self.manifest_summary().items():
            out[(stage, status)] += n
        return dict(out)

    def manifest_summary(self) -> Counter[tuple[str, str, str]]:
        """Units per (trajectory, stage, status). The index carries its own counts: on a store unchanged since its
        index this reads the index's footer and nothing else (1M scenes in well under a second); files changed
        since are read and the stale scenes' index rows (only the row groups holding them) taken off."""
        path = self._path("manifest")
        if not self.is_local:
            self.fs.invalidate_cache(self.root)
            self.fs.invalidate_cache(path)
        counts: Counter[tuple[str, str, str]] = Counter()
        if not self.fs.exists(path):
            return counts
        cols = ["scene_id", "trajectory", "stage", "status"]
        index, meta = self._manifest_index()
        fresh, stale = self._manifest_changes(path, meta)
        if index is not None and b"counts" in meta:
            counts.update({(t, st, su): n for t, st, su, n in json.loads(meta[b"counts"])})
            if stale:
                gone = self.parse_parquet(index, MANIFEST_INDEX, columns=cols,
                                          filters=[("scene_id", "in", sorted(stale))])
                counts.subtract(_unit_counts(gone))
        elif index is not None:  # an index written before it carried counts
            base = self.parse_parquet(index, MANIFEST_INDEX, columns=cols)
            if stale:
                base = base.filter(pa.compute.invert(
                    pa.compute.is_in(base["scene_id"], value_set=pa.array(sorted(stale), pa.string()))))
            counts.update(_unit_counts(base))
        for f in fresh:
            counts.update(_unit_counts(self._manifest_file(f, cols)))
        return +counts  # drop zero counts

    def index_completion(self) -> dict[str, Any] | None:
        """What the index says was complete when it was made (``{"plan", "prompts", "scenes"}``: every unit of
        the scene list with that ``prompts.parquet`` sha256 done under the keys of that plan fingerprint), if
        nothing in the manifest changed since; else None. Reads the index footer only."""
        index, meta = self._manifest_index()
        if index is None or b"complete" not in meta or not self._manifest_unchanged(self._path("manifest"), meta):
            return None
        try:
            return dict(json.loads(meta[b"complete"]))
        except (ValueError, TypeError):
            return None

    def _listing_mtimes(self, path: str) -> dict[str, float]:
        """``{file name: mtime}`` of the ``*.parquet`` files of a folder (os.scandir locally: 2x faster)."""
        if self.is_local:
            with os.scandir(path) as it:
                return {e.name: e.stat().st_mtime for e in it if e.name.endswith(".parquet")}
        self.fs.invalidate_cache(path)  # s3fs caches listings per thread: other writers' files must show
        return {info["name"].rstrip("/").rsplit("/", 1)[-1]: _mtime(info)
                for info in self.fs.ls(path, detail=True) if info["name"].endswith(".parquet")}

    def _quiet_folder_mtime(self, path: str) -> int | None:
        """The manifest folder's mtime (ns) once no write has touched it for :data:`INDEX_QUIET_S` (waiting at most
        that long), so any later write gives it a different mtime whatever the file system's timestamp
        granularity; None on object stores, for small stores (a listing is cheap there) or when it keeps
        changing."""
        if not self.is_local or self.prompt_count() < INDEX_QUIET_MIN_SCENES:
            return None
        for _ in range(3):
            mtime = os.stat(path).st_mtime_ns
            wait = mtime / 1e9 + INDEX_QUIET_S - time.time()
            if wait <= 0:
                return mtime
            if wait > INDEX_QUIET_S:  # an mtime in the future: a clock this cannot reason about
                return None
            time.sleep(wait)
        return None

    def compact_manifest(self, *, complete: dict[str, Any] | None = None) -> int:
        """Rewrite ``manifest_index.parquet`` from the index and the per-scene files changed since (one writer:
        the flow, after its tasks). Returns the number of rows indexed.

        The index's metadata also holds its rows' counts per (trajectory, stage, status) and, on local stores
        that had been quiet, the manifest folder's mtime (readers that find it unchanged list nothing).
        ``complete`` (``{"plan": fingerprint, "since": unix time, "run_id": id}``, from a flow that finished every
        unit of the store's scene list): recorded with the scene list's sha256 when no other run wrote a row since
        ``since``, so ``lyra run`` with that plan answers "nothing to do" from the footer."""
        path = self._path("manifest")
        if not self.fs.exists(path):
            return 0
        quiet = self._quiet_folder_mtime(path)
        listing = self._listing_mtimes(path)
        table = self.read_manifest().sort_by("scene_id")
        if quiet is not None and os.stat(path).st_mtime_ns != quiet:
            quiet = None  # written to while being compacted: readers list the folder
        stamp = None
        if complete is not None and quiet is not None:
            others = pa.compute.and_(pa.compute.greater_equal(table["updated_at"], float(complete["since"])),
                                     pa.compute.not_equal(table["run_id"], str(complete["run_id"])))
            prompts = self._read_bytes("prompts.parquet")
            all_done = pa.compute.all(pa.compute.equal(table["status"], "done")).as_py() is not False
            if prompts is not None and all_done and not pa.compute.any(others).as_py():
                stamp = {"plan": complete["plan"], "prompts": hashlib.sha256(prompts).hexdigest(),
                         "scenes": self.prompt_count()}
        return self.write_manifest_index(table, listing, quiet_mtime_ns=quiet, complete=stamp)

    def write_manifest_index(self, table: pa.Table, listing: dict[str, float], *, quiet_mtime_ns: int | None = None,
                             complete: dict[str, Any] | None = None) -> int:
        """Write ``table`` (every manifest row, in scene order) as the index of the per-scene files ``listing``
        (``{name: mtime}``), with its metadata (see :meth:`compact_manifest`); an unchanged index is not
        rewritten. Returns the number of rows."""
        as_of = max(listing.values(), default=0.0)
        # rows in scene order (a stable sort keeps each scene's own order): the index of an unchanged store is the
        # same table whichever per-scene file was written last, so a re-run does not rewrite it
        scenes = sorted(f.removesuffix(".parquet") for f in listing)
        counts = sorted([t, st, su, n] for (t, st, su), n in _unit_counts(table).items())
        meta = {b"as_of": repr(as_of).encode(), b"scenes": "\n".join(scenes).encode(),
                b"counts": json.dumps(counts).encode()}
        if quiet_mtime_ns is not None:
            meta[b"listing_mtime_ns"] = str(quiet_mtime_ns).encode()
        if complete is not None:
            meta[b"complete"] = json.dumps(complete, sort_keys=True).encode()
        table = table.replace_schema_metadata(meta)
        old = self._read_bytes(MANIFEST_INDEX)
        if old is None or not _same_table(old, table, check_metadata=True):
            buf = io.BytesIO()  # row groups of 64k rows: a few changed scenes read a few groups, not the index
            pq.write_table(table, buf, row_group_size=INDEX_ROW_GROUP)
            self._write_bytes(MANIFEST_INDEX, buf.getvalue())
        return table.num_rows

    # --- parquet helpers ----------------------------------------------------------------------------------
    def parse_parquet(self, data: bytes, rel: str, *, rows_only: bool = False, **kwargs: Any) -> pa.Table:
        """A Parquet file's table (``rows_only``: its footer's metadata), or one ``LyraStorageError`` naming the
        file and the repair command when it is not readable Parquet."""
        try:
            if rows_only:
                return pq.ParquetFile(io.BytesIO(data)).metadata
            return pq.read_table(io.BytesIO(data), **kwargs)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise LyraStorageError(f"{self.url}/{rel}: not a readable Parquet file ({_short(exc)}); the store is "
                                   f"damaged: `lyra verify --store {self.url} --repair`") from None

    def _relative(self, path: str) -> str:
        """A path of this store's filesystem, relative to the store root."""
        return path[len(self.root) + 1:] if path.startswith(self.root + "/") else path

    def _write_parquet(self, rel: str, table: pa.Table, *, durable: bool = True) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self._write_bytes(rel, buf.getvalue(), durable=durable)

    def _write_parquet_if_changed(self, rel: str, table: pa.Table) -> bool:
        """Write ``table`` unless the file already holds equal content (re-runs rewrite nothing)."""
        old = self._read_bytes(rel)
        if old is not None and _same_table(old, table):
            return False
        self._write_parquet(rel, table)
        return True

    def _read_parquet_dir(self, rel: str, schema: pa.Schema | None = None) -> pa.Table:
        """Concatenation of every ``*.parquet`` directly under ``rel`` (sorted by name)."""
        path = self._path(rel)
        if not self.fs.exists(path):
            return schema.empty_table() if schema is not None else pa.table({})
        files = sorted(p for p in self.fs.ls(path, detail=False) if p.endswith(".parquet"))
        if not files:
            return schema.empty_table() if schema is not None else pa.table({})
        return pa.concat_tables([self.parse_parquet(self.fs.cat_file(f), self._relative(f), schema=schema)
                                for f in files])

    # --- evaluation tables ----------------------------------------------------------------------------------
    def write_scene_table(self, kind: str, scene_id: str, table: pa.Table) -> None:
        """Per-scene result table ``eval/<kind>/<scene_id>.parquet`` (one writer per scene)."""
        self._write_parquet(f"eval/{kind}/{validate_scene_id(scene_id)}.parquet", table)

    def read_scene_table(self, kind: str, scene_id: str) -> pa.Table | None:
        rel = f"eval/{kind}/{validate_scene_id(scene_id)}.parquet"
        data = self._read_bytes(rel)
        return None if data is None else self.parse_parquet(data, rel)

    def read_tables(self, kind: str) -> pa.Table:
        """Every scene's ``eval/<kind>`` table, concatenated."""
        return self._read_parquet_dir(f"eval/{kind}")

    def write_summary_table(self, kind: str, table: pa.Table) -> bool:
        """``eval/<kind>_summary.parquet``; rewritten only when its content changed. Returns True if written."""
        return self._write_parquet_if_changed(f"eval/{kind}_summary.parquet", table)

    # --- arrays -----------------------------------------------------------------------------------------------
    @staticmethod
    def dimension_names(name: str, ndim: int) -> tuple[str, ...] | None:
        """Zarr ``dimension_names`` of a stored array (by its path), so ``xarray.open_zarr`` can open any group."""
        leaf = name.rsplit("/", 1)[-1]
        parent = name.rsplit("/", 2)[-2] if name.count("/") >= 1 else ""
        table = {
            ("input", "rgb"): ("channel", "y", "x"), ("input", "K"): ("i3", "j3"),
            ("depth", "depth"): ("y", "x"), ("depth", "reliable"): ("y", "x"),
            ("cameras", "c2w"): ("frame", "i4", "j4"), ("cameras", "K"): ("frame", "i3", "j3"),
            ("cameras", "times"): ("frame",), ("cameras", "source_frames"): ("frame",),
            ("video", "c2w"): ("frame", "i4", "j4"), ("video", "K"): ("frame", "i3", "j3"),
            ("video", "times"): ("frame",),
            ("video", "reliable"): ("frame", "band", "y", "x"),
        }  # fmt: skip
        if (parent, leaf) in table:
            dims = table[(parent, leaf)]
        elif leaf == "latents":
            dims = ("latent_channel", "latent_frame", "latent_y", "latent_x")
        elif leaf == "rgb":
            dims = ("frame", "channel", "y", "x")
        elif leaf in ("depth", "mask"):
            dims = ("frame", "band", "y", "x")
        else:
            return None
        return dims if len(dims) == ndim else None

    def existing_scene_group(self, scene_id: str) -> zarr.Group:
        """The scene's Zarr group, opened without creating anything (KeyError when it does not exist)."""
        node = self._zroot[validate_scene_id(scene_id)]
        if not isinstance(node, zarr.Group):
            raise KeyError(scene_id)
        return node

    def scene_group(self, scene_id: str) -> zarr.Group:
        """The scene's Zarr group, created if missing (opened once per store object)."""
        group = self._groups.get(scene_id)
        if group is None:
            validate_scene_id(scene_id)
            group = self._groups[scene_id] = self._zroot.require_group(scene_id)
        return group

    def write_array(
        self,
        scene_id: str,
        name: str,
        data: np.ndarray,
        *,
        chunks: tuple[int, ...] | None = None,
        attrs: dict[str, Any] | None = None,
    ) -> None:
        """(Over)write array ``name`` (e.g. ``trajectories/left/warp/rgb``) of a scene, whole."""
        group = self.scene_group(scene_id)
        arr = group.create_array(
            name, shape=data.shape, dtype=data.dtype, chunks=chunks or data.shape, overwrite=True,
            dimension_names=self.dimension_names(name, data.ndim), compressors=CHUNK_COMPRESSORS,
        )
        arr[...] = data
        if attrs:
            arr.attrs.update(attrs)

    def open_array(self, scene_id: str, name: str) -> zarr.Array:
        """The Zarr array ``name`` of a scene (one line naming it when it is missing)."""
        try:
            arr = self.scene_group(scene_id)[name]
        except KeyError:
            raise LyraStorageError(f"{self.url}: scene {scene_id!r} has no array {name!r}") from None
        if not isinstance(arr, zarr.Array):
            raise LyraStorageError(f"{self.url}: {scene_id}/{name} is a group, not an array")
        return arr

    def read_array(self, scene_id: str, name: str) -> np.ndarray:
        """The whole array, checked: a chunk that fails its checksum or cannot be decoded, or a chunk file that a
        checksummed array lacks, raises one ``LyraStorageError`` naming the store, array and chunk and the repair
        command (never fill-value zeros)."""
        arr = self.open_array(scene_id, name)
        if is_checksummed(arr):
            missing = self.missing_chunks(scene_id, name, arr)
            if missing:
                raise self.damage_error(scene_id, name, missing[0], "chunk file missing"
                                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        try:
            return np.asarray(arr[...])
        except Exception as exc:  # noqa: BLE001 - zarr/numcodecs raise ValueError, RuntimeError, zstd errors...
            key, why = self.find_bad_chunk(arr, exc)
            raise self.damage_error(scene_id, name, key, why) from None

    def array_path(self, scene_id: str, name: str, *key: str) -> str:
        """fsspec path of an array's folder (or of one of its chunk files, ``key`` like ``c/3/0/0/0``)."""
        return self._path("scenes.zarr", validate_scene_id(scene_id), name, *key)

    @staticmethod
    def chunk_keys(arr: zarr.Array) -> list[str]:
        """Every chunk key of an array (``c/i/j/...``) in C order."""
        encode = arr.metadata.chunk_key_encoding.encode_chunk_key
        return [encode(coords) for coords in np.ndindex(*arr.cdata_shape)]

    def chunk_files(self, scene_id: str, name: str = "") -> dict[str, set[str]]:
        """Chunk keys whose files exist, by array path, for every array at or under ``name`` of a scene (the whole
        scene when empty): one listing (``os.walk`` locally, one ``find`` on object stores)."""
        scene_dir = self._path("scenes.zarr", validate_scene_id(scene_id))
        base = f"{scene_dir}/{name}" if name else scene_dir
        if self.is_local:
            files = [f"{folder}/{n}" for folder, _, names in os.walk(base) for n in names]
        else:
            try:
                files = self.fs.find(base)
            except FileNotFoundError:
                files = []
            scene_dir = scene_dir.split("://", 1)[-1]
        found: dict[str, set[str]] = {}
        for f in files:
            rel = f.split("://", 1)[-1][len(scene_dir) + 1:].replace(os.sep, "/")
            array, sep, key = rel.rpartition("/c/")
            if sep and not key.endswith((".partial", ".tmp")):
                found.setdefault(array, set()).add(f"c/{key}")
        return found

    def present_chunk_keys(self, scene_id: str, name: str) -> set[str]:
        """Chunk keys of array ``name`` whose files exist (one listing of the array's folder)."""
        return self.chunk_files(scene_id, name).get(name, set())

    def missing_chunks(self, scene_id: str, name: str, arr: zarr.Array | None = None) -> list[str]:
        """Chunk keys of ``name`` whose files are absent."""
        arr = arr if arr is not None else self.open_array(scene_id, name)
        present = self.present_chunk_keys(scene_id, name)
        return [k for k in self.chunk_keys(arr) if k not in present]

    @staticmethod
    def find_bad_chunk(arr: zarr.Array, exc: BaseException) -> tuple[str, str]:
        """The first chunk of ``arr`` that does not decode, and why (``exc``: the whole-array read's error)."""
        encode = arr.metadata.chunk_key_encoding.encode_chunk_key
        for coords in np.ndindex(*arr.cdata_shape):
            sel = tuple(slice(c * n, min((c + 1) * n, size)) for c, n, size in zip(coords, arr.chunks, arr.shape,
                                                                                  strict=True))
            try:
                arr[sel]
            except Exception as chunk_exc:  # noqa: BLE001 - as above
                return encode(coords), _short(chunk_exc)
        return "?", _short(exc)

    def damage_error(self, scene_id: str, name: str, key: str, why: str) -> LyraStorageError:
        scene = "" if scene_id is None else f" --scene {scene_id}"
        return LyraStorageError(f"{self.url}: array {scene_id}/{name}, chunk {key}: {why}; the store is damaged: "
                                f"`lyra verify --store {self.url}{scene} --repair`, then `lyra run --store "
                                f"{self.url}` recomputes it")

    def list_arrays(self, scene_id: str) -> dict[str, zarr.Array]:
        """Every array of a scene by its path inside the scene group."""
        group = self.scene_group(scene_id)
        return {path: arr for path, arr in group.members(max_depth=None) if isinstance(arr, zarr.Array)}

    def scene_ids(self) -> list[str]:
        return sorted(name for name, _ in self._zroot.groups())

    # --- decoder training (train/<run>/...) -------------------------------------------------------------------
    @staticmethod
    def train_rel(run: str, *parts: str) -> str:
        """Path of a training run's file, relative to the store: ``train/<run>/<parts...>``."""
        validate_scene_id(run, source="training run name")
        return "/".join(["train", run, *parts])

    @staticmethod
    def checkpoint_rel(run: str, step: int, name: str = "") -> str:
        """``train/<run>/checkpoints/step-<8 digits>[/name]``."""
        parts = ["checkpoints", f"step-{int(step):08d}"] + ([name] if name else [])
        return RunStore.train_rel(run, *parts)

    def write_file(self, rel: str, data: bytes) -> None:
        """Atomic write of one file (temp + rename locally, one PUT on object stores)."""
        self._write_bytes(rel, data)

    def read_file(self, rel: str) -> bytes | None:
        """Bytes of a file relative to the store, or None if it does not exist."""
        return self._read_bytes(rel)

    def list_names(self, rel: str) -> list[str]:
        """Sorted names directly under a folder relative to the store ([] if it does not exist)."""
        path = self._path(rel)
        if not self.is_local:
            self.fs.invalidate_cache(path)
        if not self.fs.exists(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))

    def remove_tree(self, rel: str) -> None:
        """Delete a folder or a file relative to the store (missing is fine)."""
        path = self._path(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def write_table(self, rel: str, table: pa.Table) -> bool:
        """Write a Parquet table unless the file already holds equal content. Returns True if written."""
        return self._write_parquet_if_changed(rel, table)

    def read_table(self, rel: str) -> pa.Table | None:
        data = self._read_bytes(rel)
        return None if data is None else self.parse_parquet(data, rel)

    def read_table_dir(self, rel: str, schema: pa.Schema | None = None) -> pa.Table:
        """Every ``*.parquet`` directly under ``rel``, concatenated in name order."""
        return self._read_parquet_dir(rel, schema)

    # --- leases (one writer per scene across concurrent runs) ------------------------------------------------
    def read_lease(self, scene_id: str) -> dict[str, Any] | None:
        data = self._read_bytes(f"leases/{validate_scene_id(scene_id)}.json")
        try:
            return json.loads(data) if data else None
        except json.JSONDecodeError:
            return None  # a torn write on a non-atomic filesystem: treat as free

    def write_lease(self, scene_id: str, owner: str, ttl_s: float) -> None:
        self._write_bytes(f"leases/{validate_scene_id(scene_id)}.json", self._lease_doc(owner, ttl_s), durable=False)

    @property
    def atomic_leases(self) -> bool:
        """Whether a free lease can be claimed in one atomic create (local O_EXCL, or S3 If-None-Match)."""
        return self.is_local or self.conditional_puts

    @staticmethod
    def _lease_doc(owner: str, ttl_s: float) -> bytes:
        doc = {"owner": owner, "expires_at": time.time() + ttl_s, "host": os.uname().nodename, "pid": os.getpid()}
        return json.dumps(doc).encode()

    def read_lease_version(self, scene_id: str) -> tuple[dict[str, Any] | None, str | None]:
        """The lease and its object version (S3 ETag; None elsewhere) for a conditional replace."""
        if not self.conditional_puts:
            return self.read_lease(scene_id), None
        path = self._path(f"leases/{validate_scene_id(scene_id)}.json")
        self.fs.invalidate_cache(path)
        try:
            etag = self.fs.info(path).get("ETag")
        except FileNotFoundError:
            return None, None
        return self.read_lease(scene_id), etag

    def replace_lease(self, scene_id: str, owner: str, ttl_s: float, etag: str) -> bool:
        """S3: overwrite the lease only if it is still version ``etag`` (If-Match); False if it changed."""
        try:
            self.fs.pipe_file(self._path(f"leases/{validate_scene_id(scene_id)}.json"), self._lease_doc(owner, ttl_s),
                              IfMatch=etag)
        except (FileExistsError, FileNotFoundError):
            return False
        except OSError as exc:
            if "pre-condition" in str(exc).lower() or "precondition" in str(exc).lower():
                return False
            raise
        return True

    def create_lease_exclusive(self, scene_id: str, owner: str, ttl_s: float) -> bool:
        """Claim a free lease atomically (local O_CREAT | O_EXCL, S3 If-None-Match: *); False if it exists."""
        if self.conditional_puts:
            try:
                self.fs.pipe_file(self._path(f"leases/{validate_scene_id(scene_id)}.json"),
                                  self._lease_doc(owner, ttl_s), IfNoneMatch="*")
            except FileExistsError:
                return False
            return True
        path = Path(self._path(f"leases/{validate_scene_id(scene_id)}.json"))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._lease_doc(owner, ttl_s))
        return True

    def release_lease(self, scene_id: str, owner: str) -> None:
        lease = self.read_lease(scene_id)
        if lease is not None and lease.get("owner") == owner:
            self.fs.rm_file(self._path(f"leases/{validate_scene_id(scene_id)}.json"))

    # --- caches -------------------------------------------------------------------------------------------------
    def text_cache(self) -> TextEmbeddingCache:
        return TextEmbeddingCache(self)

    # --- runs -------------------------------------------------------------------------------------------------
    def write_run_summary(self, run_id: str, summary: dict[str, Any]) -> None:
        self._write_bytes(f"runs/{run_id}.json", json.dumps(summary, indent=2, sort_keys=True).encode())

    def run_summaries(self) -> list[dict[str, Any]]:
        path = self._path("runs")
        if not self.fs.exists(path):
            return []
        out = []
        for p in self.fs.ls(path, detail=False):
            if p.endswith(".json"):
                try:
                    out.append(json.loads(self.fs.cat_file(p)))
                except (ValueError, UnicodeDecodeError):
                    continue  # a damaged run summary is a log line lost, not the store's data: `lyra verify` names it
        return sorted(out, key=lambda s: s.get("started_at", 0))


class TextEmbeddingCache:
    """Prompt embeddings in the store, ``cache/text/<key>.safetensors`` (key: hash of encoder and prompt)."""

    def __init__(self, store: RunStore) -> None:
        self.store = store

    def get(self, key: str):
        from safetensors.torch import load

        data = self.store.read_file(f"cache/text/{key}.safetensors")
        return None if data is None else load(data)["embedding"]

    def put(self, key: str, embedding) -> None:
        from safetensors.torch import save

        self.store.write_file(f"cache/text/{key}.safetensors", save({"embedding": embedding.contiguous()}))
