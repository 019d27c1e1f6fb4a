"""Stage identity and bookkeeping: content keys for every stage of a scene, and the skip-if-done guard.

Keys are a pure function of the config and the scene record, so any process can tell what is done without
reading array data: a stage is done iff its manifest row says ``done`` under the key planned now.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lyra_ops.errors import LyraStorageError
from lyra_ops.prompts import SceneRecord
from lyra_pipeline.config import RunConfig, section_dict
from lyra_pipeline.storage import SCENE_STAGES, TRAJECTORY_STAGES, ManifestRow, RunStore, content_key
from lyra_pipeline.store import interrupt

# Bump a stage's version when its code changes what it writes: finished work is then redone.
STAGE_VERSIONS = {"input": 1, "depth": 1, "cameras": 1, "warp": 1, "refine": 1, "generate": 1, "latents": 1,
                  "video_depth": 1, "evaluate": 1}
# 2: the cover crop resamples with one scale and a fractional offset (square pixels, centred principal point);
# stages whose frame or camera went through it (image, text or video inputs, custom paths) carry it in their keys.
COVER_CROP_VERSION = 2
# Stages whose data a stage reads: each must be done under its current key before the stage may run.
UPSTREAM = {"input": (), "depth": ("input",), "cameras": ("input",), "warp": ("depth", "cameras"),
            "refine": ("warp",), "generate": ("refine",), "latents": ("generate",),
            "video_depth": ("generate",), "evaluate": ("generate",)}


def _file_sha(path: str | None) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""


def _checkpoint_fingerprint(config: RunConfig) -> str:
    """Identity of the generator's checkpoint (config files + weight file names and sizes), '' without one."""
    g = config.generator
    if g.backend == "tiny":
        from lyra_pipeline.backends.tiny_teacher import SHIPPED_TEACHER

        return inspect_checkpoint_files(str(g.model_path or SHIPPED_TEACHER))
    return _fingerprint(g.model_path, g.conditioned_path) if g.backend == "diffusers" else ""


@functools.lru_cache(maxsize=8)
def _fingerprint(model_path: str, conditioned_path: str | None) -> str:
    from lyra_pipeline.backends.diffusers_video import inspect_checkpoint

    info = inspect_checkpoint(model_path, conditioned_path)
    return info.fingerprint + (inspect_checkpoint_files(conditioned_path) if conditioned_path else "")


@functools.lru_cache(maxsize=16)
def inspect_checkpoint_files(folder: str) -> str:
    """Identity of a model folder: file names and sizes plus its JSON configs (cached per process: plan_keys
    runs for every scene of every task)."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).glob("*")):
        h.update(f"{p.name}:{p.stat().st_size}".encode())
        if p.suffix == ".json":
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def finished_scenes(store: RunStore, config: RunConfig, scenes: list[SceneRecord]) -> set[str]:
    """Scenes whose every SDG unit is recorded done under the key the current config gives."""
    if not scenes:
        return set()
    done = store.done_keys()
    units = scene_units(config)
    out = set()
    for scene in scenes:
        keys = plan_keys(config, scene)
        if all(done.get((scene.scene_id, t, s)) == keys.key(s, t) for t, s in units):
            out.add(scene.scene_id)
    return out


def scene_units(config: RunConfig) -> list[tuple[str, str]]:
    """Every SDG unit of one scene as (trajectory, stage): scene-level stages with trajectory ''."""
    return [("", s) for s in SCENE_STAGES] + [(t, s) for t in config.trajectory_names for s in TRAJECTORY_STAGES]


@dataclass(frozen=True)
class SceneKeys:
    """Content keys of every stage of one scene: scene-level and per trajectory."""

    input: str
    depth: str
    per_trajectory: dict[str, dict[str, str]]  # trajectory -> stage -> key

    def key(self, stage: str, trajectory: str = "") -> str:
        return getattr(self, stage) if stage in ("input", "depth") else self.per_trajectory[trajectory][stage]


def plan_keys(config: RunConfig, scene: SceneRecord) -> SceneKeys:
    """Every stage key of ``scene`` under ``config`` (no I/O except hashing a custom trajectory file)."""
    v = STAGE_VERSIONS
    video = section_dict(config, "video")
    input_params = {**video, "source": config.scenes.source, "kind": config.scenes.scene_kind}
    if config.is_dynamic:  # the input video: its motions and its camera
        input_params["dynamic"] = section_dict(config, "dynamic")
    if config.trajectories.custom:  # the input frame is taken with the custom path's frame-0 camera
        input_params["custom_sha"] = _file_sha(config.trajectories.custom)
    if config.scenes.source in ("images", "text", "video") or config.trajectories.custom:
        input_params["crop"] = COVER_CROP_VERSION  # the frame or its camera went through the cover crop
    if config.scenes.source == "text":
        input_params["text_to_image"] = {**section_dict(config, "text_to_image"),
                                         "checkpoint": inspect_checkpoint_files(config.text_to_image.model_path)}
    k_input = content_key("input", v["input"], input_params, {"scene": scene.content_sha, "seed": str(scene.seed)})
    depth_params = section_dict(config, "depth")
    if config.depth.backend == "transformers":
        depth_params["checkpoint"] = inspect_checkpoint_files(config.depth.model_path)
    depth_file = Path(scene.image_path).with_suffix(".depth.npy") if scene.image_path else None
    if config.depth.backend == "file" and depth_file is not None and depth_file.is_file():  # a new map: new depth
        depth_params["file_sha"] = _file_sha(str(depth_file))
    k_depth = content_key("depth", v["depth"], depth_params, {"input": k_input})
    traj_params = {**section_dict(config, "trajectories", "video"),
                   "custom_sha": _file_sha(config.trajectories.custom)}
    if config.trajectories.custom:
        traj_params["crop"] = COVER_CROP_VERSION
    else:  # frames selects from a custom path only: Lyra's paths keep the keys they had when "clip" was the default
        traj_params["trajectories"]["frames"] = "clip"
    gen_params = {**section_dict(config, "generator"), "checkpoint": _checkpoint_fingerprint(config)}
    if not config.trajectories.custom or config.trajectories.frames == "clip" \
            or config.generator.backend in ("oracle", "warp_only"):
        gen_params["generator"].pop("clip_overlap")  # one clip per path, or generated whole: overlap changes nothing
    per_traj: dict[str, dict[str, str]] = {}
    for name in config.trajectory_names:
        k_cam = content_key("cameras", v["cameras"], {**traj_params, "name": name}, {"input": k_input})
        warp_params = section_dict(config, "warp")
        k_warp = content_key("warp", v["warp"], warp_params, {"depth": k_depth, "cameras": k_cam})
        k_refine = content_key("refine", v["refine"], {**section_dict(config, "mask"), "video": video},
                               {"warp": k_warp})
        k_gen = content_key("generate", v["generate"], gen_params, {"refine": k_refine, "input": k_input,
                                                                     "cameras": k_cam})
        k_lat = content_key("latents", v["latents"], section_dict(config, "latents"), {"generate": k_gen})
        k_vdepth = content_key("video_depth", v["video_depth"], depth_params, {"generate": k_gen})
        # generate's key covers every upstream stage (depth -> warp -> refine -> generate)
        k_eval = content_key("evaluate", v["evaluate"], {}, {"generate": k_gen})
        per_traj[name] = {"cameras": k_cam, "warp": k_warp, "refine": k_refine, "generate": k_gen,
                          "latents": k_lat, "video_depth": k_vdepth, "evaluate": k_eval}
    return SceneKeys(k_input, k_depth, per_traj)



def plan_fingerprint(config: RunConfig) -> str:
    """One hash of everything but the scene that the keys of ``config`` depend on: the keys of a probe scene (the
    config sections, stage versions, checkpoints, custom path, units per scene all enter them). Two configs with
    the same fingerprint give every scene the same keys, so a store stamped complete under it (the manifest
    index's ``complete``) is complete under the other: ``lyra run`` answers without planning 1M scenes' keys."""
    import json

    probe = SceneRecord("probe", "", None, "0" * 64, 0, config.scenes.source)
    keys = plan_keys(config, probe)
    doc = {"input": keys.input, "depth": keys.depth, "trajectories": keys.per_trajectory,
           "units": scene_units(config)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]

@dataclass
class StageReport:
    """What one task did: how many (scene, trajectory) units it computed and how many it found done."""

    scene_id: str
    stage: str
    computed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    trajectories: list[str] = field(default_factory=list)


# Units finished by each Prefect task run in this process, so that a retried attempt (Prefect keeps the task run
# id across retries) counts the units its failed attempt finished as computed, not as found done: otherwise no run
# summary counts them. Outside a task run (a task's function called directly) nothing is remembered. Only the
# most recent task runs are kept (a retry follows its failure within seconds; memory stays bounded at any scale).
_COMPUTED_BY_TASK_RUN: OrderedDict[str, set[tuple[str, ...]]] = OrderedDict()
_COMPUTED_LOCK = threading.Lock()
_COMPUTED_TASK_RUNS_KEPT = 1024


def _task_run_id() -> str | None:
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    return str(ctx.task_run.id) if ctx is not None else None


def remember_computed(unit: tuple[str, ...]) -> None:
    run = _task_run_id()
    if run is not None:
        with _COMPUTED_LOCK:
            _COMPUTED_BY_TASK_RUN.setdefault(run, set()).add(unit)
            _COMPUTED_BY_TASK_RUN.move_to_end(run)
            while len(_COMPUTED_BY_TASK_RUN) > _COMPUTED_TASK_RUNS_KEPT:
                _COMPUTED_BY_TASK_RUN.popitem(last=False)


def computed_in_this_task_run(unit: tuple[str, ...]) -> bool:
    run = _task_run_id()
    with _COMPUTED_LOCK:
        return run is not None and unit in _COMPUTED_BY_TASK_RUN.get(run, ())


class StageRun:
    """Guard around one unit of stage work: skip if done; else mark running, run, then mark done or failed.

    Usage::

        with StageRun(store, scene_id, trajectory, "warp", key, run_id, report) as run:
            if not run.skip:
                ...compute and write arrays...
    """

    def __init__(self, store: RunStore, scene_id: str, trajectory: str, stage: str, key: str, run_id: str,
                 report: StageReport, *, mark_running: bool = True) -> None:
        self.store, self.scene_id, self.trajectory, self.stage, self.key = store, scene_id, trajectory, stage, key
        self.run_id, self.report, self.mark_running = run_id, report, mark_running
        self.skip = store.is_done(scene_id, trajectory, stage, key)
        # done by an earlier attempt of this same task run (a retry after a transient error): computed by this run
        self.unit = (store.url, scene_id, trajectory, stage, key)
        self.earlier = self.skip and computed_in_this_task_run(self.unit)

    def _row(self, status: str, duration: float = 0.0, error: str = "") -> ManifestRow:
        return ManifestRow(self.scene_id, self.trajectory, self.stage, status, self.key, duration, error,
                           self.run_id)

    def __enter__(self) -> StageRun:
        if self.earlier:
            self.report.computed += 1
        elif self.skip:
            self.report.skipped += 1
        else:
            if self.mark_running:
                self.store.record([self._row("running")], durable=False)
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.skip:
            return False
        duration = time.perf_counter() - self._t0
        if exc is not None:
            if isinstance(exc, interrupt.Interrupted | KeyboardInterrupt) or interrupt.stopping():
                # stopped by Ctrl-C / SIGTERM (whatever the error it caused): pending, never failed
                self.store.record([self._row("interrupted", duration, "interrupted (Ctrl-C / SIGTERM): redone by "
                                             "the next run")])
                return False
            summary = "".join(traceback.format_exception_only(exc_type, exc)).strip()
            self.store.record([self._row("failed", duration, summary[:2000])])
            return False
        self.store.record([self._row("done", duration)])
        remember_computed(self.unit)
        self.report.computed += 1
        self.report.seconds += duration
        return False


def _not_done(url: str, scene_id: str, stage: str, key: str, trajectory: str) -> LyraStorageError:
    where = f"{scene_id}/{trajectory}" if trajectory else scene_id
    return LyraStorageError(f"{url}: stage {stage!r} of {where} is not done for the current config (expected key "
                            f"{key}); run it first, e.g. `lyra stage {stage}`")


def check_upstream(url: str, store: RunStore | None, config: RunConfig, scene: SceneRecord, stage: str) -> None:
    """Every unit of ``stage`` of ``scene`` that is not done yet must find its upstream units done under the
    current keys (``store`` None: no store yet, nothing is done). Reads only: a stage that cannot run fails
    before it writes anything (no ``running`` or ``failed`` row over a done unit)."""
    keys = plan_keys(config, scene)
    names = [""] if stage in SCENE_STAGES else list(config.trajectory_names)
    for name in names:
        if store is not None and store.is_done(scene.scene_id, name, stage, keys.key(stage, name)):
            continue
        for up in UPSTREAM[stage]:
            up_name = "" if up in SCENE_STAGES else name
            key = keys.key(up, up_name)
            if store is None or not store.is_done(scene.scene_id, up_name, up, key):
                raise _not_done(url, scene.scene_id, up, key, up_name)


LEASE_TTL_S = 600.0  # a lease not renewed for this long is stale (its run died) and may be taken over
LEASE_POLL_S = 0.5
LEASE_SETTLE_S = 0.05  # re-read after writing: the last writer wins a simultaneous claim (local rename)
LEASE_SETTLE_REMOTE_S = 0.5  # object stores: allow for request latency between another run's read and write


def lease_owner(run_id: str) -> str:
    return f"{run_id}:{os.uname().nodename}:{os.getpid()}:{threading.get_ident()}"


class SceneLease:
    """Exclusive right to write one scene (its arrays and manifest) across concurrent runs on one store.

    A lease is a small JSON file (``leases/<scene>.json``: owner, expiry). ``acquire`` waits while another
    live owner holds it. A free lease is claimed with one atomic create (local ``O_EXCL``; S3 ``If-None-Match:
    *``); a stale one (expired, or its process on this host is gone) is taken over on S3 with ``If-Match`` on the
    version judged stale, so exactly one of several claimants wins. Where neither exists (local takeovers,
    other object stores) the claim is written and re-read after a short settle time so that of two simultaneous
    claims only the last writer proceeds. ``renew`` extends the expiry (at most every quarter TTL); on S3 it
    also checks the lease is still this owner's and raises if another run took it over.
    """

    def __init__(self, store: RunStore, scene_id: str, owner: str, ttl_s: float = LEASE_TTL_S) -> None:
        self.store, self.scene_id, self.owner, self.ttl_s = store, scene_id, owner, ttl_s

    def acquire(self, timeout_s: float = 24 * 3600.0) -> None:
        deadline = time.time() + timeout_s
        while True:
            lease, version = self.store.read_lease_version(self.scene_id)
            if self._claim(lease, version):
                self.store.forget_manifest(self.scene_id)  # another run may have written it meanwhile
                if lease is not None and lease.get("owner") != self.owner:  # taken over from a killed run:
                    self.store.clean_partial_files(self.scene_id)  # drop the chunks it was writing
                self._written = time.time()
                return
            if time.time() > deadline:
                raise LyraStorageError(f"{self.store.url}: scene {self.scene_id!r} is leased by {lease} for longer "
                                       f"than {timeout_s:.0f} s")
            time.sleep(LEASE_POLL_S)

    def _claim(self, lease: dict | None, version: str | None = None) -> bool:
        """Try to take the lease seen as ``lease`` (object version ``version``); True when this owner holds it."""
        if lease is None and self.store.atomic_leases:  # free: one atomic exclusive create, no settle time
            return self.store.create_lease_exclusive(self.scene_id, self.owner, self.ttl_s)
        if lease is not None and lease.get("owner") != self.owner and not self.stale(lease):
            return False  # held by a live run
        if lease is not None and version is not None:  # S3: replace exactly the version judged stale (or ours)
            return self.store.replace_lease(self.scene_id, self.owner, self.ttl_s, version)
        self.store.write_lease(self.scene_id, self.owner, self.ttl_s)
        time.sleep(LEASE_SETTLE_S if self.store.is_local else LEASE_SETTLE_REMOTE_S)
        lease = self.store.read_lease(self.scene_id)
        return lease is not None and lease.get("owner") == self.owner

    @staticmethod
    def stale(lease: dict) -> bool:
        """Expired, or held by a process of this host that no longer exists (a killed run)."""
        if lease.get("expires_at", 0) < time.time():
            return True
        if lease.get("host") == os.uname().nodename and isinstance(lease.get("pid"), int):
            try:
                os.kill(lease["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def renew(self) -> None:
        """Extend the expiry, at most every quarter TTL (a write per unit would cost more than it protects)."""
        if time.time() - self._written > self.ttl_s / 4:
            if self.store.conditional_puts:
                lease, version = self.store.read_lease_version(self.scene_id)
                if lease is None or lease.get("owner") != self.owner or version is None or \
                        not self.store.replace_lease(self.scene_id, self.owner, self.ttl_s, version):
                    raise LyraStorageError(f"{self.store.url}: lease of scene {self.scene_id!r} was taken over by "
                                           f"{(lease or {}).get('owner')!r} (this run stalled past its TTL); stopping")
            else:
                self.store.write_lease(self.scene_id, self.owner, self.ttl_s)
            self._written = time.time()

    def release(self) -> None:
        self.store.release_lease(self.scene_id, self.owner)


def run_units(store_url: str, config: RunConfig, scene: SceneRecord, stage: str, run_id: str,
              compute: Callable[[RunStore, str], None]) -> StageReport:
    """Run ``compute(store, trajectory)`` for every unit of ``stage`` of ``scene`` that is not done yet.

    Units are the scene itself (trajectory ``""``) for scene-level stages, else one per trajectory. Each unit
    is guarded by ``StageRun`` (skip if done; running -> done / failed) after its upstream units are checked.
    """
    store, keys = RunStore(store_url), plan_keys(config, scene)
    names = [""] if stage in SCENE_STAGES else list(config.trajectory_names)
    report = StageReport(scene.scene_id, stage, trajectories=[n for n in names if n])
    if all(store.is_done(scene.scene_id, n, stage, keys.key(stage, n)) for n in names):  # no lease, no write
        # units an earlier attempt of this task run finished (a retry) are this run's work: counted once, here
        report.computed = sum(computed_in_this_task_run((store.url, scene.scene_id, n, stage, keys.key(stage, n)))
                              for n in names)
        report.skipped = len(names) - report.computed
        return report
    from lyra_pipeline.threads import pin_torch_threads

    pin_torch_threads(config.compute.torch_threads)  # workers must not oversubscribe the cores
    interrupt.check()  # after Ctrl-C no unit starts
    interrupt.register(store.url, run_id)
    lease = SceneLease(store, scene.scene_id, lease_owner(run_id))
    lease.acquire()
    try:
        check_upstream(store.url, store, config, scene, stage)  # before any row is written
        # One manifest write marks every pending unit running (then one per finished unit).
        store.record([ManifestRow(scene.scene_id, n, stage, "running", keys.key(stage, n), run_id=run_id)
                      for n in names if not store.is_done(scene.scene_id, n, stage, keys.key(stage, n))],
                     durable=False)
        for name in names:
            interrupt.check()
            with StageRun(store, scene.scene_id, name, stage, keys.key(stage, name), run_id, report,
                          mark_running=False) as run:
                if run.skip:
                    continue
                compute(store, name)  # its upstream units were checked above, under this lease
            lease.renew()
    finally:
        lease.release()
    return report
