"""The ``lyra`` command line: run the pipeline, inspect and debug a store.

Importing this module loads typer, rich, pydantic and PyYAML only: torch, Prefect, Zarr, Arrow and the model
libraries are imported inside the commands, after their arguments and input files are checked, so a mistake
is answered in about a second (``tests/test_cli_latency.py`` guards it, ``benchmarks/bench_cli_latency.py``
times it).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lyra_ops.errors import LyraConfigError, LyraError, LyraInputError
from lyra_pipeline.config import TEXT_TO_IMAGE_HELP, RunConfig, build_config, load_config_file
from lyra_pipeline.store.names import EVAL_STAGES, SCENE_STAGES, STAGES

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="lyra-pipeline: Lyra-style 3D scene data generation, resumable on any store.")
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
DEFAULT_STORE = "./lyra_store"
VERBOSE_HELP = "show Prefect's task logs"


def RunStore(url, *, create: bool = True):
    """:class:`lyra_pipeline.store.runstore.RunStore`, imported on first use (Zarr, Arrow and fsspec load only
    when a command opens a store). With ``create`` False, a local path without ``store.json`` is refused here, with
    the store's own words, before those imports (about 1-2 s on a loaded 2-core machine)."""
    if not create:
        _check_local_store(url)
    from lyra_pipeline.store.runstore import RunStore as _RunStore

    return _RunStore(url, create=create)


def _local_root(url) -> Path | None:
    """The folder of a local store path (``file://`` included), None for any other URL."""
    text = str(url)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return None if "://" in text else Path(text)


def _check_local_store(url) -> None:
    """A local store path with no ``store.json``: the one line ``RunStore(url, create=False)`` would say, without
    importing it (any other URL, or a path that has one, is left to RunStore)."""
    root = _local_root(url)
    if root is None:
        return
    try:
        os.stat(root / "store.json")
    except (FileNotFoundError, NotADirectoryError):
        from lyra_ops.errors import LyraStorageError

        raise LyraStorageError(f"{url}: not a lyra store (no store.json)") from None
    except OSError:  # permission and the like: RunStore names it
        return


def _local_scene_ids(url) -> list[str] | None:
    """The scene ids of a local store read from its folder (``scenes.zarr/<id>/zarr.json``) without Zarr, or None
    when that cannot be told (another URL, an unreadable folder): then ask RunStore."""
    root = _local_root(url)
    if root is None:
        return None
    scenes = root / "scenes.zarr"
    try:
        if not scenes.is_dir():
            return [] if (root / "store.json").is_file() else None
        return sorted(p.name for p in scenes.iterdir() if (p / "zarr.json").is_file())
    except OSError:
        return None


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.print(f"lyra-pipeline {version('lyra-pipeline')}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="print the installed version and exit"),
) -> None:
    """lyra-pipeline: Lyra-style 3D scene data generation, resumable on any store."""


def check_out_path(path: Path, suffixes: tuple[str, ...]) -> Path:
    """An output file path whose folder exists and whose extension is one of ``suffixes`` (checked before any
    work); otherwise one ``LyraInputError`` line naming the path and what is expected."""
    if path.suffix.lower() not in suffixes:
        raise LyraInputError(f"{path}: --out must end in one of {', '.join(suffixes)}")
    if not path.parent.is_dir():
        raise LyraInputError(f"{path}: folder {path.parent} does not exist (create it first)")
    return path


def check_new_file(path: Path, what: str, example: str, siblings: tuple[str, ...] = ()) -> Path:
    """An output file that may be created or replaced: not an existing folder, and (with ``siblings``, suffixes of
    files written beside it) neither are those; its folder may be missing (it is created) but not be a file. One
    ``LyraInputError`` line naming the path else (``example``: a file name to suggest inside a folder), checked
    before any work."""
    if path.is_dir():
        raise LyraInputError(f"{path}: is an existing folder; {what} expects a file path, e.g. {path / example}")
    for p in (path.with_suffix(s) for s in siblings):
        if p.is_dir():
            raise LyraInputError(f"{p}: is an existing folder, where the export writes a file beside {path.name}; "
                                 f"rename it or choose another {what}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LyraInputError(f"{path}: {parent} is a file, not a folder; {what} expects a file path in a "
                                     "folder")
            break
    return path


def _stored_scene(store: str, scene: str) -> None:
    """``export-ply`` / ``refine``: a missing store or an unknown scene id is one line before torch loads (the
    scene's finished trajectories are checked where they are read)."""
    _check_local_store(store)
    scenes = _local_scene_ids(store)  # a quick "no such scene" before Zarr loads; a listed one is confirmed by it
    if scenes is None or scene in scenes:
        scenes = RunStore(store, create=False).scene_ids()
    if scene not in scenes:
        shown = ", ".join(scenes[:20]) + (" ..." if len(scenes) > 20 else "")
        raise LyraInputError(f"{store}: no scene {scene!r}; scenes: {shown or 'none'}")


def _setup_env(verbose: bool = False) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "lyra_torch_extensions"))
    if not verbose:
        _quiet_console()


def _quiet_console() -> None:
    """Put :class:`ConsoleFailureFilter` on the root logger's console handlers (main()'s, or Prefect's once it has
    configured logging); idempotent, and it imports nothing (a finished store's re-run stays Prefect-free)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ConsoleFailureFilter) for f in handler.filters):
            handler.addFilter(ConsoleFailureFilter())


class ConsoleFailureFilter(logging.Filter):
    """Prefect's console output without tracebacks: a failed task run stays one line (its exception's message),
    a failed flow run's line is dropped (the CLI prints its ``error:`` line). The Prefect API and ``--verbose``
    keep the full records."""

    def filter(self, record: logging.LogRecord) -> bool:
        from lyra_pipeline.store import interrupt

        if interrupt.stopping() and record.name.startswith(("prefect", "distributed", "asyncio")):
            return False  # after Ctrl-C the command says one line; what stopping stirs up is not news
        if record.name.startswith("prefect.flow_runs") and record.exc_info:
            return False
        if record.name.startswith("prefect.task_runs") and "DistributedJobError" in record.getMessage():
            return False  # a training job's failure: the command prints it as its own `error:` line
        if record.name.startswith("prefect.task_runs") and record.exc_info:
            # the API handler (on the task-run logger, called before this root handler) already sent it whole
            record.exc_info, record.exc_text = None, None
        return True


def _overrides(config_file: Path | None, num_scenes: int | None, images: Path | None, trajectory: Path | None,
               seed: int | None, video: Path | None = None, poses: Path | None = None) -> tuple[str | None, dict]:
    preset, over = load_config_file(config_file) if config_file else (None, {})
    if video is not None or poses is not None:
        if video is None or poses is None:
            raise LyraConfigError("--video and --poses go together: a video file and its poses (one per frame)")
        sc = over.setdefault("scenes", {})
        sc.update(source="video", video_path=str(video.resolve()), poses_path=str(poses.resolve()), num_scenes=1)
        over.setdefault("depth", {}).setdefault("backend", "planar")
        over.setdefault("generator", {}).setdefault("backend", "warp_only")
    if num_scenes is not None:
        over.setdefault("scenes", {})["num_scenes"] = num_scenes
    if images is not None:
        if not images.is_dir():  # named now, before the store's libraries load (the preflight's words)
            raise LyraInputError(f"{images.resolve()}: images folder not found (expected a folder of NAME.png + "
                                 "NAME.txt)")
        sc = over.setdefault("scenes", {})
        sc["source"], sc["images_dir"] = "images", str(images.resolve())
        if "num_scenes" not in sc:  # every image of the folder unless --num-scenes (or the config file) says
            from lyra_pipeline.inputs import image_files

            found = len(image_files(images)) if images.is_dir() else 0
            sc["num_scenes"] = max(found, 1)  # an empty or missing folder fails in preflight, naming it
        over.setdefault("depth", {}).setdefault("backend", "planar")
        over.setdefault("generator", {}).setdefault("backend", "warp_only")
    if trajectory is not None:
        over.setdefault("trajectories", {})["custom"] = str(trajectory.resolve())
    if seed is not None:
        over["seed"] = seed
    return preset, over


def _bind(store: str, command: str, preset: str | None, config_file: Path | None, num_scenes: int | None,
          images: Path | None, trajectory: Path | None, seed: int | None, video: Path | None = None,
          poses: Path | None = None, *, plan=None, must_exist: bool = False):
    """The config of ``command`` on ``store``: the store's recorded dataset (when it exists) with the user's
    options on top; options that change the store's scene list are refused (``lyra_pipeline.store.dataset``).
    Reads only; ``must_exist``: a missing store is one error line (nothing is created)."""
    missing = f"{store}: no lyra store there (no store.json); `lyra run --store {store}` makes one"
    if must_exist:
        try:
            _check_local_store(store)  # a missing local store before Zarr and Arrow load
        except LyraError:
            raise LyraInputError(missing) from None
    file_preset, over = _overrides(config_file, num_scenes, images, trajectory, seed, video, poses)
    from lyra_pipeline.store.dataset import bind
    from lyra_pipeline.store.runstore import store_exists

    existing = RunStore(store, create=False) if store_exists(store) else None
    if existing is None and must_exist:
        raise LyraInputError(missing)
    return bind(existing, preset or file_preset, over, command=command,
                default_preset="dynamic" if video is not None else "default", plan=plan)


def planned_units(cfg: RunConfig, only_scenes: list[str] | None,
                  records: list | None = None) -> dict[tuple[str, str, str], str]:
    """The units this run must finish: (scene, trajectory, stage) -> its content key under ``cfg``, for the run's
    scenes only (``--scene``, else the config's scene list; ``records``: that list when already known, so an image
    folder is not hashed again)."""
    from lyra_pipeline.planning import scene_records
    from lyra_pipeline.stages import plan_keys, scene_units

    units = scene_units(cfg)
    out = {}
    for scene in records if records is not None else scene_records(cfg):
        if only_scenes and scene.scene_id not in only_scenes:
            continue
        keys = plan_keys(cfg, scene)
        for trajectory, stage in units:
            out[(scene.scene_id, trajectory, stage)] = keys.key(stage, trajectory)
    return out


def _done_units(store: RunStore, units: dict[tuple[str, str, str], str]) -> int:
    """How many of this run's ``units`` the store records as done with the key this config gives them."""
    done = store.done_keys()
    return sum(1 for unit, key in units.items() if done.get(unit) == key)


def _log(message: str) -> None:
    """One plain line on stderr (no rich markup: paths may hold brackets)."""
    console.print(message, markup=False, highlight=False)


def _interruptible(line: str):
    """Ctrl-C / SIGTERM during a command that runs in this thread: its units in flight recorded as interrupted,
    children stopped, ``interrupted: <line>`` and exit 130 (``lyra_pipeline.store.interrupt``)."""
    from lyra_pipeline.store import interrupt

    return interrupt.handling(lambda: line)


def _fail(exc: BaseException) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


PresetOpt = typer.Option(None, "--preset", help="smoke | default (the default) | paper | dynamic-smoke | dynamic")
ConfigOpt = typer.Option(None, "--config", exists=False, help="YAML file with config overrides")
StoreOpt = typer.Option(DEFAULT_STORE, "--store", help="local path or fsspec URL of the run store")
NumScenesOpt = typer.Option(None, "--num-scenes", min=1, help="number of scenes")
ImagesOpt = typer.Option(None, "--images", help="folder of NAME.png + NAME.txt inputs")
TrajectoryOpt = typer.Option(None, "--trajectory", help="custom trajectory .npz or .json")
SeedOpt = typer.Option(None, "--seed", help="run seed")
WorkersOpt = typer.Option(2, "--workers", min=1, help="concurrent scene tasks")


@app.command()
def run(
    preset: str = PresetOpt,
    config: Path = ConfigOpt,
    store: str = StoreOpt,
    num_scenes: int = NumScenesOpt,
    images: Path = ImagesOpt,
    trajectory: Path = TrajectoryOpt,
    seed: int = SeedOpt,
    workers: int = WorkersOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Prefect's task logs"),
    only_scenes: list[str] = typer.Option(None, "--scene", help="only these scene ids"),
    dask: bool = typer.Option(False, "--dask", help="run scene tasks on a local Dask cluster (--workers processes)"),
    dask_address: str = typer.Option(None, "--dask-address", help="run scene tasks on an existing Dask scheduler"),
    gpus: int = typer.Option(0, "--gpus", min=0, help="one Dask worker per GPU for video generation (plus --workers "
                             "CPU workers for the other stages); with --dask-address: the scheduler's workers that "
                             "offer resource GPU=1"),
    video: Path = typer.Option(None, "--video", help="a monocular video (mp4/webm): one dynamic scene (with --poses)"),
    poses: Path = typer.Option(None, "--poses", help="the video's camera per frame: .npz (w2c, intrinsics, optional "
                               "times) or .json (frames with c2w/w2c, K, optional time)"),
) -> None:
    """Generate (or complete) a dataset: every stage of every scene, skipping finished work."""
    import time

    command_started = time.time()  # the summary says where the wall time went, not only the flow's own part
    _setup_env(verbose)
    try:  # every input is checked before the store is created or written
        from lyra_pipeline.planning import plan_scenes

        if not (gpus or dask_address or only_scenes) and _finished_from_index(
                store, preset, config, num_scenes, images, trajectory, seed, video, poses):
            return
        binding = _bind(store, "run", preset, config, num_scenes, images, trajectory, seed, video, poses,
                        plan=lambda cfg: plan_scenes(cfg, _log))
        name, over, cfg, records = binding.preset, binding.overrides, binding.config, binding.records
        if gpus:
            over, cfg = _gpu_overrides(name, over, cfg, gpus, dask_address, config)
        check_scene_ids(only_scenes, records)
        if dask_address:
            from lyra_pipeline.cluster import check_scheduler

            check_scheduler(dask_address)
        st = RunStore(store)  # fail fast on an unusable store
        st.check_writable()
        if _nothing_to_do(st, name, over, cfg, records, only_scenes):
            return
    except LyraError as exc:
        _fail(exc)
    from lyra_pipeline.reconstruct import config_fallbacks, fallback_summary

    fallbacks = config_fallbacks(cfg)  # the stand-ins the scenes are made with (images without models): said now
    for line in fallbacks:
        _log(line)
    from flows.generate_dataset import PipelineFailed, generate_dataset

    if not verbose:
        _quiet_console()  # Prefect's own console handler, when it configured one (no main(): embedded use)

    try:
        flow = generate_dataset.with_options(task_runner=make_task_runner(workers, dask, dask_address, gpus))
    except LyraError as exc:
        _fail(exc)
    result: dict[str, Any] = {}
    from flows.generate_dataset import new_run_id
    from lyra_pipeline.store import interrupt

    run_id = new_run_id()
    interrupt.register(st.url, run_id)  # Ctrl-C: this run's running rows become interrupted (Dask workers' too)

    def target() -> None:
        try:
            result["summary"] = flow(store=store, preset=name, overrides=over, run_id=run_id, scene_ids=only_scenes,
                                     gpu_stages=bool(gpus))
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    units = planned_units(cfg, only_scenes, records)  # this run's scenes and units, not the store's other content
    scenes = len({scene for scene, _, _ in units})

    def interrupted() -> str:
        done = _done_units(RunStore(store, create=False), units)
        return (f"{done} of {len(units)} units done, {len(units) - done} will resume on the next run "
                f"(`lyra run --store {store}`)")

    thread = threading.Thread(target=target, daemon=True)
    with interrupt.handling(interrupted) as work_thread, \
            Progress(TextColumn("[bold]lyra run[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                     TimeElapsedColumn(), console=console, transient=False) as progress:
        bar = progress.add_task(f"{name}: {scenes} scene{'s' if scenes != 1 else ''}", total=len(units))
        work_thread(thread)
        flow_called = time.time()
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
            try:
                progress.update(bar, completed=_done_units(RunStore(store), units))
            except Exception:  # noqa: BLE001 - progress is best effort while files are being replaced
                pass
        progress.update(bar, completed=_done_units(RunStore(store), units))
    err = result.get("error")
    if err is not None:
        if isinstance(err, PipelineFailed | LyraError):
            _fail(err)
        raise err
    s = result["summary"]
    console.print(f"run {s['run_id']}: computed {s['computed']} stage units, reused {s['skipped']} "
                  f"in {s['finished_at'] - s['started_at']:.1f} s of scene work -> {store}"
                  + (f"; fallbacks: {fallback_summary(fallbacks)}" if fallbacks else ""), markup=False,
                  highlight=False)
    console.print(run_time_line(command_started, flow_called, s["started_at"], s["finished_at"], time.time(),
                                process_started()))


def process_started() -> float | None:
    """When this process started (epoch seconds, to about 1 s: /proc's boot time is whole seconds), or None."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration, AttributeError):
        return None


def run_time_line(command: float, flow_called: float, work_started: float, work_finished: float,
                  ended: float, process: float | None = None) -> str:
    """Where a `lyra run`'s wall time went (the flow's own scene work is only part of it): Python's start and the
    CLI's import (from ``process``, the process start, when it is recent), input checks and imports before the
    flow was called, Prefect's start (its local server, the flow's own checks and scene planning) before the
    scene work, the scene work, Prefect's wrap-up (run records) after it."""
    parts = [(flow_called - command, "checks and imports"),
             (work_started - flow_called, "starting Prefect and the flow (its local server, input checks)"),
             (work_finished - work_started, "scene work"), (ended - work_finished, "Prefect's wrap-up")]
    first = command
    if process is not None and 0 <= command - process < 300:  # not an embedded call in a long-lived process
        parts.insert(0, (command - process, "starting Python and the CLI"))
        first = process
    return (f"{ended - first:.1f} s in all: "
            + ", ".join(f"{max(seconds, 0.0):.1f} s {what}" for seconds, what in parts))


def check_scene_ids(only_scenes: list[str] | None, records: list) -> None:
    """``--scene`` ids must be scenes of the dataset (one line naming the unknown ones and some known ones)."""
    if not only_scenes:
        return
    known = [r.scene_id for r in records]
    unknown = sorted(set(only_scenes) - set(known))
    if unknown:
        raise LyraInputError(f"--scene: unknown scene id(s) {unknown} for this config; its scenes: "
                             f"{', '.join(known[:12])}{' ...' if len(known) > 12 else ''}")


def _finished_from_index(store: str, preset: str | None, config_file: Path | None, num_scenes: int | None,
                         images: Path | None, trajectory: Path | None, seed: int | None, video: Path | None,
                         poses: Path | None) -> bool:
    """``lyra run`` on a store whose manifest index stamps every scene of its list done under the plan this
    config gives (``RunStore.index_completion``: nothing written to the manifest since): says "nothing to do"
    from the index footer, without planning every scene's keys (1M scenes in about a second). Only for scene
    lists that follow from the config alone (procedural, dynamic) and when the run would write nothing; anything
    else (or any doubt) takes the planned way, which says the same or does the work."""
    import hashlib

    root = _local_root(store)
    if root is not None and not (root / "store.json").is_file():
        return False  # a new local store: nothing finished (and no store libraries loaded to learn it)
    file_preset, user = _overrides(config_file, num_scenes, images, trajectory, seed, video, poses)
    from lyra_pipeline.config import merge
    from lyra_pipeline.stages import plan_fingerprint
    from lyra_pipeline.store.dataset import DATASET_FILE, dataset_doc, read_dataset
    from lyra_pipeline.store.runstore import store_exists

    if not store_exists(store):
        return False
    st = RunStore(store, create=False)
    stored = read_dataset(st)
    if stored is None:
        return False
    name, over = preset or file_preset or stored.preset, merge(stored.overrides, user)
    cfg, was = build_config(name, over, source=f"{DATASET_FILE} + options"), stored.config()
    if cfg.scenes.source not in ("procedural", "dynamic") or (cfg.scenes, cfg.seed) != (was.scenes, was.seed):
        return False
    stamp = st.index_completion()
    if stamp is None or stamp.get("scenes") != cfg.scenes.num_scenes or stamp.get("plan") != plan_fingerprint(cfg):
        return False
    prompts = st.read_file("prompts.parquet")
    if prompts is None or hashlib.sha256(prompts).hexdigest() != stamp.get("prompts"):
        return False
    if st.read_file(DATASET_FILE) != dataset_doc(name, over, cfg.scenes.num_scenes):
        return False  # the run would record another dataset: the planned way writes it
    console.print(f"nothing to do: all {cfg.scenes.num_scenes} scenes are done under the current config -> {st.url}")
    return True


def _nothing_to_do(store: RunStore, name: str, over: dict[str, Any], cfg: RunConfig, records: list,
                   only_scenes: list[str] | None) -> bool:
    """True (and says so) when every scene of the run is done under the current config: a finished batch
    resumes without starting a Prefect server or flow run."""
    from lyra_pipeline.stages import finished_scenes
    from lyra_pipeline.store.dataset import record_dataset

    wanted = set(only_scenes or ())
    scenes = [r for r in records if not wanted or r.scene_id in wanted]
    if not scenes or finished_scenes(store, cfg, scenes) != {s.scene_id for s in scenes}:
        return False
    record_dataset(store, name, over, records)  # what the flow records (each file rewritten only if it changed)
    console.print(f"nothing to do: all {len(scenes)} scenes are done under the current config -> {store.url}")
    return True


def _gpu_overrides(name: str, over: dict[str, Any], cfg: RunConfig, gpus: int, dask_address: str | None,
                   config_file: Path | None) -> tuple[dict[str, Any], RunConfig]:
    """``--gpus``: check the GPUs exist (locally; a remote scheduler's workers declare theirs), run one task per
    stage (GPU stages go to GPU workers), and put a model teacher on ``cuda``."""
    from lyra_pipeline.cluster import check_gpus
    from lyra_pipeline.config import merge

    if not dask_address:
        check_gpus(gpus)
    extra: dict[str, Any] = {"compute": {"tasks": "stage"}}
    if cfg.generator.backend in ("tiny", "diffusers") and cfg.generator.device == "cpu":
        extra["generator"] = {"device": "cuda"}
    over = merge(over, extra)
    return over, build_config(name, over, source=str(config_file or "command line"))


def make_task_runner(workers: int, dask: bool = False, dask_address: str | None = None, gpus: int = 0):
    """Threads in this process (default), a local Dask cluster of ``workers`` single-threaded processes, or an
    existing Dask scheduler; ``gpus``: a local cluster of one worker per GPU beside ``workers`` CPU workers
    (:mod:`lyra_pipeline.cluster`)."""
    if gpus and not dask_address:
        from prefect_dask import DaskTaskRunner

        from lyra_pipeline.cluster import gpu_cluster_spec

        return DaskTaskRunner(cluster_class="distributed.SpecCluster", cluster_kwargs=gpu_cluster_spec(gpus, workers))
    if not dask and not dask_address:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise LyraError("Dask scale-out needs prefect-dask: pip install 'lyra-pipeline[dask]'") from exc
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@app.command()
def retry(
    preset: str = PresetOpt,
    config: Path = ConfigOpt,
    store: str = StoreOpt,
    num_scenes: int = NumScenesOpt,
    images: Path = ImagesOpt,
    trajectory: Path = TrajectoryOpt,
    seed: int = SeedOpt,
    workers: int = WorkersOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
    dask: bool = typer.Option(False, "--dask", help="run scene tasks on a local Dask cluster (--workers processes)"),
    dask_address: str = typer.Option(None, "--dask-address", help="run scene tasks on an existing Dask scheduler"),
) -> None:
    """Re-run only the scenes that have failed units in the manifest, with the store's dataset (the inputs of the
    run that failed them; options as for `run`, and like there they may not change the scene list)."""
    try:
        _bind(store, "retry", preset, config, num_scenes, images, trajectory, seed, must_exist=True)
        failed = sorted({r["scene_id"] for r in RunStore(store, create=False).read_manifest().to_pylist()
                         if r["status"] == "failed"})
    except LyraError as exc:
        _fail(exc)
    if not failed:
        console.print("no failed scenes")
        return
    console.print(f"retrying {len(failed)} scene(s): {', '.join(failed[:20])}")
    run(preset=preset, config=config, store=store, num_scenes=num_scenes, images=images, trajectory=trajectory,
        seed=seed, workers=workers, verbose=verbose, only_scenes=failed, dask=dask, dask_address=dask_address, gpus=0,
        video=None, poses=None)


@app.command()
def evaluate(
    preset: str = PresetOpt,
    config: Path = ConfigOpt,
    store: str = StoreOpt,
    num_scenes: int = NumScenesOpt,
    images: Path = ImagesOpt,
    trajectory: Path = TrajectoryOpt,
    seed: int = SeedOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="also evaluate this decoder model.safetensors on "
                                    "every scene (PSNR/SSIM vs teacher and ground truth)"),
    lpips_weights: Path = typer.Option(None, "--lpips-weights", help="local LPIPS-VGG weights (.pth): adds LPIPS to "
                                       "the decoder metrics"),
    lpips_backbone: Path = typer.Option(None, "--lpips-backbone", help="torchvision VGG16 state dict, when "
                                        "--lpips-weights holds only the linear heads"),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="with --checkpoint: the decoder "
                                   "beside no-learning baselines (flat, RGB-D, ceiling) on trajectory frames and "
                                   "held-out cameras of procedural scenes"),
    optimize: bool = typer.Option(False, "--optimize", help="with --checkpoint: add the per-scene optimisation "
                                  "baselines (300 and 1000 steps; ~10 min per 176x320 scene on a CPU)"),
) -> None:
    """Dataset quality against exact ground truth: teacher/warp PSNR and SSIM, mask leakage and false holes."""
    _setup_env(verbose)
    try:
        binding = _bind(store, "evaluate", preset, config, num_scenes, images, trajectory, seed, must_exist=True)
        name, over = binding.preset, binding.overrides
        if checkpoint is not None and not checkpoint.is_file():
            raise LyraError(f"{checkpoint}: decoder checkpoint not found")
        from flows.evaluate_dataset import evaluable_scenes

        evaluable_scenes(RunStore(store, create=False), binding.config, binding.records)  # none: one line, now
    except LyraError as exc:
        _fail(exc)
    from flows.evaluate_dataset import evaluate_dataset
    from flows.generate_dataset import PipelineFailed

    try:
        with _interruptible("evaluation: units done stay done; the next `lyra evaluate` computes the rest"):
            summary = evaluate_dataset(store=store, preset=name, overrides=over,
                                       checkpoint=str(checkpoint.resolve()) if checkpoint else None,
                                       lpips_weights=str(lpips_weights) if lpips_weights else None,
                                       lpips_backbone=str(lpips_backbone) if lpips_backbone else None,
                                       baselines=baselines, optimize=optimize)
    except (PipelineFailed, LyraError) as exc:
        _fail(exc)
    table = Table(title=f"dataset quality: {store}", caption="PSNR in dB vs ground truth (warp: over refined-mask "
                  "pixels); leak = valid pixels hidden from the source / hidden pixels; holes = false holes / seen")
    cols = [("path", "group"), ("frames", "frames"), ("teacher\nPSNR", "teacher_psnr_gt"),
            ("teacher\nSSIM", "teacher_ssim_gt"), ("warp\nPSNR", "warp_psnr_gt"), ("leak\nplain", "leak_rate_plain"),
            ("leak\nrefined", "leak_rate_refined"), ("holes\nplain", "false_hole_rate_plain"),
            ("holes\nrefined", "false_hole_rate_refined")]
    for label, _ in cols:
        table.add_column(label, justify="right")
    decoders = [r for r in summary if str(r["group"]).startswith("decoder")]
    quality = [r for r in summary if "split" in r and "method" in r]
    for row in summary:
        if row in decoders or row in quality:
            continue
        cells = []
        for _, key in cols:
            v = row[key]
            cells.append(f"{v:.2%}" if key.startswith(("leak", "false")) else f"{v:.3f}" if isinstance(v, float)
                         else str(v))
        table.add_row(*cells)
    out.print(table)
    for row in decoders:
        out.print(f"{row['group']}: {row['scenes']} scenes, {row['frames']} frames: PSNR vs teacher "
                  f"{row['psnr_teacher']:.2f} dB, vs ground truth {row['psnr_gt']:.2f} dB, SSIM vs ground truth "
                  f"{row['ssim_gt']:.3f}")
    if quality:
        out.print(quality_rich_table(quality))


def quality_rich_table(rows: list[dict[str, Any]]) -> Table:
    """The decoder-quality table (``lyra_pipeline.quality.quality_table`` rows) for the console."""
    from rich import box

    views = ", ".join(f"{split} {n} views" for split, n in dict((r["split"], r["frames"]) for r in rows).items())
    scenes = max((r["scenes"] for r in rows), default=0)
    table = Table(title=f"decoder beside no-learning baselines: {scenes} procedural scenes ({views})",
                  caption="vs exact ground truth; PSNR in dB, mean over scenes ± std over scenes; seen = pixels "
                          "some input frame saw; depth = AbsRel where alpha > 0.5 (flat: a plane at the input's "
                          "median depth)", box=box.SIMPLE_HEAD)
    for label in ("split", "method", "PSNR", "PSNR seen", "SSIM", "LPIPS", "depth"):
        table.add_column(label, justify="left" if label in ("split", "method") else "right", no_wrap=True)

    def num(row: dict[str, Any], key: str, fmt: str, spread: bool = False) -> str:
        value, std = row.get(key, float("nan")), row.get(f"{key}_std", float("nan"))
        if value != value:  # NaN: not measured
            return "–"
        return format(value, fmt) + (f"±{format(std, fmt)}" if spread and std == std else "")

    for r in rows:
        table.add_row(r["split"], r["method"], num(r, "psnr", ".2f", True), num(r, "psnr_seen", ".2f", True),
                      num(r, "ssim", ".3f"), num(r, "lpips", ".3f"), num(r, "depth_absrel", ".3f"))
    return table


@app.command()
def status(store: str = StoreOpt, failed: bool = typer.Option(False, "--failed", help="list failures")) -> None:
    """Per-stage counts (done / running / failed) from the manifest, and what the last run did."""
    try:
        st = RunStore(store, create=False)
        summary = st.manifest_summary()  # from the index footer when the manifest is unchanged since it
        n_scenes = st.prompt_count()
        bad = st.read_manifest(columns=["scene_id", "trajectory", "stage", "status", "error"],
                               status="failed").to_pylist() if failed else []
    except LyraError as exc:
        _fail(exc)
    out_table = Table(title=f"{store}: {n_scenes} scenes")
    out_table.add_column("stage")
    statuses = ["done", "running"]
    present_statuses = {status for _, _, status in summary}
    statuses += [s for s in ("interrupted", "damaged") if s in present_statuses]  # both pending: the next run redoes
    statuses.append("failed")
    for col in (*statuses, "units"):
        out_table.add_column(col, justify="right")
    n_traj = len({t for t, _, _ in summary} - {""})  # trajectories recorded in the store
    counts = Counter()
    for (_, stage, status), n in summary.items():
        counts[(stage, status)] += n
    present = {stage for stage, _ in counts}
    stages = [*STAGES, *(s for s in EVAL_STAGES if s in present)]
    for stage in stages:
        units = n_scenes * (1 if stage in SCENE_STAGES else n_traj)
        out_table.add_row(stage, *(str(counts[(stage, status)]) for status in statuses), str(units))
    out.print(out_table)
    runs = st.run_summaries()
    if runs:
        last = runs[-1]
        if "finished_at" in last:
            out.print(f"last run {last['run_id']} ({last['preset']}): computed {last['computed']}, "
                      f"reused {last['skipped']}, failed scenes {len(last['failed_scenes'])}, "
                      f"{last['finished_at'] - last['started_at']:.1f} s")
        else:
            out.print(f"last run {last['run_id']} ({last.get('preset')}): {last.get('status', 'did not finish')}")
    if failed:
        for r in bad:
            out.print(f"[red]FAILED[/] {r['scene_id']} {r['trajectory'] or '-'} {r['stage']}: {r['error']}")
        if not bad:
            out.print("no failures")


@app.command()
def verify(
    store: str = StoreOpt,
    scene: list[str] = typer.Option(None, "--scene", help="only these scene ids (default: every scene and the "
                                    "store-level tables)"),
    repair: bool = typer.Option(False, "--repair", help="mark damaged units for recompute (the next `lyra run` "
                                "recomputes exactly those), drop unreadable indexes and derived tables, rebuild an "
                                "unreadable scene list from the dataset record"),
    json_out: Path = typer.Option(None, "--json", help="also write the report as JSON here"),
) -> None:
    """Check every chunk (presence, crc32c) and table of every finished unit; exit 1 when damage is found
    (0 after --repair made it recomputable)."""
    import json

    try:
        _check_local_store(store)
        listed = _local_scene_ids(store)
        if scene and listed is not None:  # an unknown --scene before Zarr loads (a listed one: checked below too)
            manifest = _local_root(store) / "manifest"
            names = {p.stem for p in manifest.glob("*.parquet")} if manifest.is_dir() else set()
            unknown = sorted(set(scene) - set(listed) - names)
            if unknown:
                raise LyraInputError(f"--scene: {store} has no scene(s) {unknown}")
        from lyra_pipeline.store.verify import verify_store

        st = RunStore(store, create=False)
        if scene:
            known = set(st.scene_ids()) | {n.removesuffix(".parquet") for n in st.list_names("manifest")}
            unknown = sorted(set(scene) - known)
            if unknown:
                raise LyraInputError(f"--scene: {store} has no scene(s) {unknown}")
        report = verify_store(st, scene or None, repair=repair, log=lambda line: _log(f"DAMAGED {line}"))
    except LyraError as exc:
        _fail(exc)
    if json_out is not None:
        json_out.write_text(json.dumps(report.as_dict(), indent=2))
    what = (f"{report.scenes} scenes, {report.units} finished units, {report.arrays} arrays, {report.chunks} chunks, "
            f"{report.tables} tables: {report.bytes / 1e6:.1f} MB in {report.seconds:.2f} s "
            f"({report.mb_per_s:.0f} MB/s)")
    if report.unchecksummed_arrays:
        what += f"; {report.unchecksummed_arrays} arrays predate checksums (decoded instead)"
    units = report.damaged_units
    if not report.damage:
        out.print(f"verified {what}: no damage")
        return
    out.print(f"verified {what}: {len(report.damage)} damaged ({len(units)} unit(s))", markup=False)
    if not repair:
        console.print(f"repair: `lyra verify --store {store} --repair`, then `lyra run --store {store}`", markup=False)
        raise typer.Exit(1)
    for line in report.repaired:
        out.print(f"repaired: {line}", markup=False)
    for line in report.unrepaired:
        console.print(f"NOT REPAIRED: {line}", markup=False)
    if report.unrepaired:
        raise typer.Exit(1)
    if report.skipped_leased:
        console.print(f"not repaired (a live run holds them): {', '.join(report.skipped_leased)}", markup=False)
        raise typer.Exit(1)
    console.print(f"next: `lyra run --store {store}` recomputes them", markup=False)


@app.command()
def inspect(
    scene: str = typer.Argument(..., help="scene id"),
    store: str = StoreOpt,
    out: Path = typer.Option(None, "--out", help="output: PNG contact sheet, or with --array .png/.gif/.webp/.mp4"),
    trajectory: list[str] = typer.Option(None, "--trajectory", help="limit to these trajectories"),
    frames: int = typer.Option(3, "--frames", min=1, help="frames per trajectory (contact sheet)"),
    array: str = typer.Option(None, "--array", help="one array, e.g. trajectories/left/teacher/rgb: print its "
                              "shape, dtype, chunks, stats; export its frames with --out"),
    list_arrays: bool = typer.Option(False, "--list", help="list every array of the scene"),
) -> None:
    """Contact sheet of a scene (input, depth, warps, masks, teacher), or any one array: stats and frames."""
    try:
        if out is not None:
            check_new_file(out, "--out", f"{scene}{'' if array else '_sheet'}{out.suffix or '.png'}")
            check_out_path(out, (".png", ".gif", ".webp", ".mp4") if array else (".png", ".jpg", ".jpeg", ".webp"))
        _stored_scene(store, scene)  # a missing store or scene before Zarr, numpy and PIL load
        from lyra_pipeline.inspect import array_frames, array_info, contact_sheet, export_frames

        st = RunStore(store, create=False)
        if scene not in st.scene_ids():
            raise LyraError(f"{store}: no scene {scene!r}; scenes: {', '.join(st.scene_ids()[:20])}")
        if list_arrays:
            table = Table(title=f"{scene}: arrays")
            for col in ("array", "shape", "dtype", "chunks"):
                table.add_column(col)
            for name, arr in sorted(st.list_arrays(scene).items()):
                table.add_row(name, str(tuple(arr.shape)), str(arr.dtype), str(tuple(arr.chunks)))
            out_console = Console(soft_wrap=True)
            out_console.print(table)
            return
        if array:
            info = array_info(st, scene, array)
            # an array without an image form is refused (one line) before its stats are printed or a file written
            images = array_frames(st.read_array(scene, array), array) if out is not None else None
            for key, value in info.items():
                console.print(f"{key:>10}: {value}")
            if out is None and st.list_arrays(scene)[array].size <= 4096:
                import numpy as np

                print(np.array2string(st.read_array(scene, array), precision=5, suppress_small=True))
            if out is not None:
                export_frames(images, out)
                console.print(f"wrote {out}")
            return
        path = check_new_file(out or Path(f"{scene}_sheet.png"), "--out", f"{scene}_sheet.png")  # default too
        sheet = contact_sheet(st, scene, trajectory or None, frames)
    except (LyraError, ValueError, RuntimeError) as exc:
        _fail(exc)
    sheet.save(path)
    console.print(f"wrote {path} ({sheet.width}x{sheet.height})")


@app.command()
def stage(
    name: str = typer.Argument(..., help=f"one of: prompts, {', '.join(STAGES)}"),
    preset: str = PresetOpt,
    config: Path = ConfigOpt,
    store: str = StoreOpt,
    scene: list[str] = typer.Option(None, "--scene", help="only these scene ids"),
    num_scenes: int = NumScenesOpt,
    images: Path = ImagesOpt,
    trajectory: Path = TrajectoryOpt,
    seed: int = SeedOpt,
) -> None:
    """Run one stage locally, in this process, without Prefect (for debugging)."""
    _setup_env()
    if name != "prompts" and name not in STAGES:  # tasks.sdg's SCENE_TASKS (Prefect, torch) loads once it is valid
        _fail(LyraError(f"unknown stage {name!r}; expected one of: prompts, {', '.join(STAGES)}"))
    try:  # the store's own dataset; every check before the store is created or written
        from lyra_pipeline.stages import check_upstream
        from lyra_pipeline.store.dataset import record_dataset
        from lyra_pipeline.store.runstore import store_exists

        binding = _bind(store, "stage", preset, config, num_scenes, images, trajectory, seed)
        cfg = binding.config
        check_scene_ids(scene, binding.records)
        scenes = [s for s in binding.records if not scene or s.scene_id in scene]
        if name != "prompts":
            existing = RunStore(store, create=False) if store_exists(store) else None
            for s in scenes:  # an upstream stage that is not done: one line, nothing written
                check_upstream(store, existing, cfg, s, name)
        if binding.grows:  # a new store: this is its dataset (an existing one keeps its scene list)
            record_dataset(RunStore(store), binding.preset, binding.overrides, binding.records)
        if name == "prompts":
            console.print(f"{len(scenes)} scenes in {store}/prompts.parquet")
            return
        from tasks.sdg import SCENE_TASKS

        fn = SCENE_TASKS[name].fn
        computed = skipped = 0
        with Progress(TextColumn(f"[bold]{name}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            for s in progress.track(scenes):
                rep = fn(store, cfg, s, "stage-" + name)
                computed, skipped = computed + rep.computed, skipped + rep.skipped
    except LyraError as exc:
        _fail(exc)
    console.print(f"stage {name}: computed {computed}, reused {skipped}")


TrainPresetOpt = typer.Option("default", "--preset", help="training preset: smoke | default | dynamic | paper")


NprocOpt = typer.Option(1, "--nproc", min=1, help="training processes per machine (torchrun, DDP; one per GPU)")
NnodesOpt = typer.Option(1, "--nnodes", min=1, help="machines in the job (run the same command on each)")
RdzvOpt = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT where the job's machines meet (with --nnodes > 1)")


@app.command()
def train(
    store: str = StoreOpt,
    preset: str = TrainPresetOpt,
    config: Path = typer.Option(None, "--config", help="YAML with training overrides (stages, optim, ...)"),
    steps: int = typer.Option(None, "--steps", min=1, help="scale every stage's steps to this total"),
    batch: int = typer.Option(None, "--batch", min=1, help="samples per step (global batch, split over the ranks; "
                              "default: the preset's, or --nproc x --nnodes when that is larger)"),
    nproc: int = NprocOpt,
    nnodes: int = NnodesOpt,
    rdzv_endpoint: str = RdzvOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
) -> None:
    """Distill the 3DGS decoder from the store's teacher videos (resumes; a finished run does nothing)."""
    _setup_env(verbose)
    from lyra_pipeline.distributed import torchrun_command
    from lyra_pipeline.train_config import build_train_config  # pydantic only: torch and Prefect load once it passed

    try:
        _check_local_store(store)  # a missing local store now; an existing one is opened once the arguments passed
        torchrun_command([], nproc=nproc, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint)  # validates the endpoint
        file_preset, over = load_config_file(config) if config else (None, {})
        name = file_preset or preset
        source = str(config or "command line")
        if steps is not None:
            base = build_train_config(name, over, source=source)
            total = base.total_steps
            stages = [s.model_dump() for s in base.stages]
            for s in stages:
                s["steps"] = max(1, round(s["steps"] * steps / total)) if s["steps"] else 0
            over = {**over, "stages": stages}
        base = build_train_config(name, over, source=source)
        if batch is None and nproc * nnodes > base.batch:
            batch = nproc * nnodes  # one sample per rank (a run of its own: the batch names the run)
        if batch is not None:
            over = {**over, "batch": batch}
        cfg = build_train_config(name, over, source=source)
        RunStore(store, create=False)
        from lyra_pipeline.runner import check_world_size

        check_world_size(nproc, nnodes, cfg.batch, "train.batch")
        from flows.distill_decoder import distill_decoder

        with _interruptible("training stopped; the next `lyra train` resumes from its last checkpoint (the same "
                            "bytes as an uninterrupted run)"):
            summary = distill_decoder(store=store, preset=name, overrides=over, nproc=nproc, nnodes=nnodes,
                                      rdzv_endpoint=rdzv_endpoint)
    except (LyraError, FloatingPointError) as exc:
        _fail(exc)
    for line in summary.get("interrupted", []):  # a killed rank Prefect's retry resumed: say so
        _log(line)
    console.print(f"decoder {summary['run']}: {summary['step']} steps ({summary['steps_computed']} computed now"
                  + (f" on {summary['world_size']} processes" if summary.get("world_size", 1) > 1 else "") + ")")
    if "psnr_gt" in summary:
        out.print(f"held-out scenes: {summary['scenes']}, frames {summary['frames']}: PSNR vs teacher "
                  f"{summary['psnr_teacher']:.2f} dB, vs ground truth {summary['psnr_gt']:.2f} dB, SSIM vs ground "
                  f"truth {summary['ssim_gt']:.3f}")


@app.command("train-teacher")
def train_teacher_cmd(
    store: str = StoreOpt,
    preset: str = typer.Option("tiny", "--preset", help="teacher preset: smoke | tiny (the shipped one)"),
    config: Path = typer.Option(None, "--config", help="YAML with teacher overrides (steps, unet, lr, ...)"),
    steps: int = typer.Option(None, "--steps", min=1, help="total optimiser steps"),
    export: Path = typer.Option(None, "--export", help="also write the finished teacher folder here (e.g. "
                                "lyra_pipeline/weights/tiny_teacher)"),
    nproc: int = NprocOpt,
    nnodes: int = NnodesOpt,
    rdzv_endpoint: str = RdzvOpt,
    parallel: str = typer.Option("ddp", "--parallel", help="with --nproc/--nnodes: ddp (the model on every rank) or "
                                 "fsdp (sharded over the ranks: video models too large for one GPU)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
) -> None:
    """Fine-tune the camera-conditioned teacher on an oracle store's exact pairs (resumes; a finished run does
    nothing); report it against the warp-only baseline on held-out scenes."""
    _setup_env(verbose)
    from lyra_pipeline.distributed import torchrun_command
    from lyra_pipeline.train_config import build_teacher_config  # pydantic only: torch and Prefect load once it passed

    try:
        _check_local_store(store)  # a missing local store now; an existing one is opened once the arguments passed
        torchrun_command([], nproc=nproc, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint)  # validates the endpoint
        file_preset, over = load_config_file(config) if config else (None, {})
        preset = file_preset or preset
        if steps is not None:
            over = {**over, "steps": steps}
        if parallel not in ("ddp", "fsdp"):
            raise LyraConfigError(f"--parallel {parallel!r}: expected ddp or fsdp")
        cfg = build_teacher_config(preset, over)
        if nproc * nnodes > cfg.streams and "streams" not in over:
            over = {**over, "streams": nproc * nnodes}  # one sampling stream per rank (names a run of its own)
            cfg = build_teacher_config(preset, over)
        RunStore(store, create=False)
        from lyra_pipeline.runner import check_world_size

        check_world_size(nproc, nnodes, cfg.streams, "teacher streams")
        from flows.train_teacher import train_teacher

        with _interruptible("teacher training stopped; the next `lyra train-teacher` resumes from its last "
                            "checkpoint"):
            summary = train_teacher(store=store, preset=preset, overrides=over,
                                    export_to=str(export) if export else None, nproc=nproc, nnodes=nnodes,
                                    rdzv_endpoint=rdzv_endpoint, parallel=parallel)
    except (LyraError, FloatingPointError) as exc:
        _fail(exc)
    console.print(f"teacher {summary['run']}: {summary['step']} steps ({summary['steps_computed']} computed now); "
                  f"folder {store}/{summary['model']}" + (f" and {export}" if export else ""))
    if "teacher_psnr_disoccluded" in summary:
        out.print(f"held-out ({summary['val_trajectories']} trajectories, {100 * summary['disoccluded_fraction']:.1f}% "
                  f"disoccluded): PSNR on disoccluded pixels teacher {summary['teacher_psnr_disoccluded']:.2f} dB, "
                  f"warp-only {summary['warp_only_psnr_disoccluded']:.2f} dB, oracle exact; all pixels teacher "
                  f"{summary['teacher_psnr_all']:.2f} dB, warp-only {summary['warp_only_psnr_all']:.2f} dB")


def _export_options(prune_ratio: float, min_opacity: float, layout: str, smoothing: float, backdrop: str,
                    viewer_smoothing: float) -> dict[str, Any]:
    """The export options of export-ply, refine and reconstruct: ``ExportOptions``' keyword arguments, and what
    their content keys and the refine flow record."""
    return {"prune_ratio": prune_ratio, "min_opacity": min_opacity, "layout": layout, "smoothing": smoothing,
            "backdrop": backdrop, "viewer_smoothing": viewer_smoothing}


PruneOpt = typer.Option(0.0, "--prune-ratio", help="drop this fraction of the least opaque Gaussians (Lyra's "
                        "pruning), after --min-opacity")
MinOpacityOpt = typer.Option(0.0, "--min-opacity", help="drop Gaussians less opaque than this")
SmoothingOpt = typer.Option(0.0, "--smoothing", help="widen every Gaussian of the PLY by this many squared input "
                           "pixels (Mip-Splatting's 3D filter); 0 (default) writes them as decoded (0.2 costs ~5 dB "
                           "at the input camera, ~0.4 dB at novel ones, in a renderer at the data's size)")
ViewerSmoothingOpt = typer.Option(0.2, "--viewer-smoothing", help="the same widening for the Gaussians embedded in "
                                  "the --html viewer only, whose window is several times the data's size (without "
                                  "it PlayCanvas shows a dot grid of the per-pixel Gaussians)")
LayoutOpt = typer.Option("compact", "--layout", help="PLY vertex layout: compact (x y z f_dc opacity scale rot) or "
                         "inria (the original 3DGS layout, with zero normals and zero f_rest_0..44)")


BackdropOpt = typer.Option("auto", "--backdrop", help="auto: bake the background the Gaussians were trained over "
                           "into the PLY as an opaque sphere behind the scene, so every viewer shows the scene as "
                           "training saw it (refinements need none); none: the scene's Gaussians only")


@app.command("export-ply")
def export_ply(
    scene: str = typer.Argument(..., help="scene id"),
    store: str = StoreOpt,
    out: Path = typer.Option(None, "--out", help="output path (default: <scene>.ply; --format usd: <scene>.usd, "
                             ".usda or .usdc; usdz: <scene>.usdz; nurec: <scene>.nurec.usdz)"),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="decoder model.safetensors (default: the store's "
                                    "newest finished training, else the decoder shipped with the package)"),
    html: bool = typer.Option(False, "--html", help="also write a self-contained HTML viewer (needs node/npx)"),
    prune_ratio: float = PruneOpt,
    min_opacity: float = MinOpacityOpt,
    layout: str = LayoutOpt,
    smoothing: float = SmoothingOpt,
    viewer_smoothing: float = ViewerSmoothingOpt,
    backdrop: str = BackdropOpt,
    times: str = typer.Option(None, "--times", help="dynamic scenes: a Gaussian sequence at these input frames, "
                              "'all' or e.g. 0,12,24: <out stem>_<frame>.ply each (SuperSplat plays numbered PLYs "
                              "as an animation), <out stem>.sequence.json (`lyra view` plays it) and a PNG strip; "
                              "with --format usd/usdz one stage with a time sample per frame"),
    fmt: str = typer.Option("ply", "--format", help="ply (3DGS PLY + PNG strip), usd or usdz (OpenUSD "
                            "ParticleField3DGaussianSplat, Y-up metres; needs pip install 'lyra-pipeline\\[usd]'), "
                            "nurec (the USDZ NVIDIA 3DGRUT writes for Isaac Sim 5.x)"),
) -> None:
    """Decode a stored scene into 3D Gaussians: standard 3DGS PLY + a PNG strip (teacher above, render below), or
    an OpenUSD stage (--format)."""
    _setup_env()
    try:
        _stored_scene(store, scene)
    except LyraError as exc:
        _fail(exc)
    from lyra_pipeline.outputs import scene_export_key, up_to_date, up_to_date_lines

    export_options = _export_options(prune_ratio, min_opacity, layout, smoothing, backdrop, viewer_smoothing)
    # content-addressed: the same stored scene, decoder and options as the sidecar beside the PLY -> nothing to do
    key, inputs = scene_export_key("export-ply", store, scene, checkpoint, export_options, html, times=times) \
        if fmt == "ply" else (None, None)
    done = up_to_date(out or Path(f"{scene}.ply"), key)
    if done is not None:
        for line in up_to_date_lines(out or Path(f"{scene}.ply"), done):
            _log(line)
        return
    from lyra_pipeline.outputs import write_sidecar
    from lyra_pipeline.reconstruct import ExportOptions, export_scene, export_sequence, export_summary, record_export

    try:
        if fmt != "ply":
            from rich.markup import escape

            from lyra_pipeline.reconstruct import fallback_summary
            from lyra_pipeline.usd_export import export_scene_usd, usd_target

            try:
                if html:
                    raise LyraInputError(f"--html: not available with --format {fmt} (the HTML viewer shows a PLY)")
                target = check_new_file(usd_target(out, scene, fmt), "--out", usd_target(None, scene, fmt).name)
                usd = export_scene_usd(store, scene, target, fmt, times=times, checkpoint=checkpoint, log=_log,
                                       options=ExportOptions(**export_options))
            except LyraError as exc:  # escaped: rich would take the install hint's "[usd]" for markup
                _fail(LyraError(escape(str(exc))))
            for line in usd.fallbacks:
                _log(line)
            steps = (f"{len(usd.frames)} time samples (frames {usd.frames[0]}..{usd.frames[-1]}), "
                     if usd.frames and len(usd.gaussians) > 1 else "")
            counts = sorted(set(usd.gaussians))
            console.print(f"wrote {usd.path} ({steps}{counts[0]}" + (f"-{counts[-1]}" if len(counts) > 1 else "")
                          + " Gaussians"
                          + (f", {usd.backdrop} of them the backdrop" if usd.backdrop else "") + ")"
                          + (f"; fallbacks: {fallback_summary(usd.fallbacks)}" if usd.fallbacks else ""))
            return
        target = check_new_file(out or Path(f"{scene}.ply"), "--out", f"{scene}.ply",
                                () if times is not None else (".png", ".html"))
        if target.suffix.lower() != ".ply":
            raise LyraInputError(f"{target}: --out must be a .ply path")
        options = ExportOptions(**export_options)
        if times is not None:
            if html:
                raise LyraInputError("--html: not available with --times (the HTML viewer shows one PLY); open the "
                                     "sequence with `lyra view <stem>.sequence.json` or drop the PLYs on SuperSplat")
            seq = export_sequence(store, scene, out or Path(f"{scene}.ply"), times=times, checkpoint=checkpoint,
                                  log=_log, options=options)
            for line in seq.fallbacks:
                _log(line)
            summary = (f"wrote {len(seq.plys)} PLYs ({seq.plys[0].name} .. {seq.plys[-1].name}, "
                       f"{min(seq.gaussians)}-{max(seq.gaussians)} Gaussians each"
                       + (f", {seq.backdrop} of them the backdrop" if seq.backdrop else "") + f"), {seq.index}"
                       + (f", {seq.strip}" if seq.strip else ""))
            write_sidecar(out or Path(f"{scene}.ply"), key, inputs or {}, seq.files, list(seq.fallbacks), summary)
            console.print(summary)
            return
        res = export_scene(store, scene, out or Path(f"{scene}.ply"), checkpoint=checkpoint, html=html, log=_log,
                           options=options)
        record_export(res, key, inputs)
    except LyraError as exc:
        _fail(exc)
    for line in res.fallbacks:
        _log(line)
    console.print(export_summary(res))


@app.command()
def refine(
    scene: str = typer.Argument(..., help="scene id"),
    store: str = StoreOpt,
    steps: int = typer.Option(300, "--steps", help="optimiser steps (one teacher frame each; ~0.3-0.6 s per step "
                              "at 176x320 on one CPU core)"),
    init: str = typer.Option("auto", "--init", help="start from: decoder (the decoder's Gaussians), rgbd (the input "
                             "frame's and the trajectories' last frames' RGB-D point cloud), auto (decoder)"),
    background: str = typer.Option("random", "--background", help="behind the fitted views: random (a new colour "
                                   "each view, so the scene looks the same over any viewer background) or white"),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="decoder model.safetensors for --init decoder "
                                    "(default: the store's newest finished training, else the shipped decoder)"),
    out: Path = typer.Option(None, "--out", help="PLY path (default: <scene>-refined.ply)"),
    html: bool = typer.Option(False, "--html", help="also write a self-contained HTML viewer (needs node/npx)"),
    prune_ratio: float = PruneOpt,
    min_opacity: float = MinOpacityOpt,
    layout: str = LayoutOpt,
    smoothing: float = SmoothingOpt,
    viewer_smoothing: float = ViewerSmoothingOpt,
    backdrop: str = BackdropOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
) -> None:
    """Optimise one stored scene's 3D Gaussians against its teacher frames (resumes; a finished one does
    nothing), then write the PLY (+ strip, + HTML) like export-ply."""
    _setup_env(verbose)
    try:  # the checks that need no torch, before it loads
        if steps < 1:
            raise LyraInputError(f"--steps: expected an integer >= 1, got {steps}")
        if (out or Path(f"{scene}-refined.ply")).suffix.lower() != ".ply":
            raise LyraInputError(f"{out}: --out must be a .ply path")
        _stored_scene(store, scene)
    except LyraError as exc:
        _fail(exc)
    from lyra_pipeline.outputs import scene_export_key, up_to_date, up_to_date_lines, write_sidecar

    export_options = _export_options(prune_ratio, min_opacity, layout, smoothing, backdrop, viewer_smoothing)
    # content-addressed: the same stored scene, decoder, refinement and export options -> nothing to do
    key, inputs = scene_export_key("refine", store, scene, checkpoint, export_options, html,
                                   decoder_needed=init != "rgbd",
                                   refine={"steps": steps, "init": init, "background": background})
    done = up_to_date(out or Path(f"{scene}-refined.ply"), key)
    if done is not None:
        for line in up_to_date_lines(out or Path(f"{scene}-refined.ply"), done):
            _log(line)
        return
    from lyra_pipeline.reconstruct import (
        ExportOptions,
        fallback_summary,
        refine_summary,
        resolve_decoder,
        scene_fallbacks,
        scene_teacher,
    )
    from lyra_pipeline.refine import RefineConfig
    from lyra_pipeline.training import scene_trajectories

    try:  # everything is checked before anything is written
        config = RefineConfig(steps=steps, init=init, background=background)
        ExportOptions(**export_options)  # bad export options fail here
        target = out or Path(f"{scene}-refined.ply")
        st = RunStore(store, create=False)
        trajectories = scene_trajectories(st, scene)
        if config.init != "rgbd":
            resolve_decoder(st, checkpoint, _log)
        fallbacks, teacher = scene_fallbacks(st, scene, trajectories), scene_teacher(st, scene, trajectories)
        for line in fallbacks:  # what the teacher frames it fits were made with
            _log(line)
        from flows.refine_scene import refine_scene  # Prefect: once every input passed

        with _interruptible("refinement stopped; the next `lyra refine` resumes from its last checkpoint (the "
                            "same bytes as an uninterrupted run)"):
            result = refine_scene(scene=scene, store=store, steps=steps, init=init, background=background,
                                  checkpoint=str(checkpoint) if checkpoint else None, out=str(target), html=html,
                                  export=export_options)
    except LyraError as exc:
        _fail(exc)
    _log(refine_summary(result, teacher) + f"; {result['steps_computed']} steps computed now")
    ex = result["export"]
    summary = (f"wrote {ex['ply']} ({ex['gaussians']} Gaussians)" + (f", {ex['strip']}" if ex["strip"] else "")
               + (f", {ex['html']}" if ex["html"] else "")
               + (f"; fallbacks: {fallback_summary(fallbacks)}" if fallbacks else ""))
    files = [Path(ex["ply"]), *(Path(ex[k]) for k in ("strip", "html") if ex[k])]
    write_sidecar(ex["ply"], key, inputs or {}, files + ([Path(ex["ply"]).with_suffix(".viewer.json")] if ex["html"]
                                                         else []), fallbacks, summary,
                  refinement={"name": result["name"], "sha256": result["sha256"]},
                  result={"camera": stored_input_camera(st, scene, trajectories)})
    console.print(summary)


def stored_input_camera(st, scene: str, trajectories: list[str]) -> dict | None:
    """A stored scene's input camera (frame 0 of its first trajectory, where every path starts) as the export
    sidecar records it (:func:`lyra_pipeline.reconstruct.camera_record`), or None when it cannot be read."""
    import torch

    from lyra_pipeline.reconstruct import camera_record

    try:
        name = trajectories[0]
        c2w = torch.from_numpy(st.read_array(scene, f"trajectories/{name}/cameras/c2w")[0])
        K = torch.from_numpy(st.read_array(scene, f"trajectories/{name}/cameras/K")[0])
        _, height, width = st.list_arrays(scene)["input/rgb"].shape
        return camera_record(c2w, K, height, width)
    except Exception:  # noqa: BLE001 - only where `lyra view` opens: never an error of the refinement
        return None


@app.command()
def reconstruct(
    image: Path = typer.Option(None, "--image", help="input image (PNG/JPEG/WebP)"),
    prompt: str = typer.Option(None, "--prompt", help="text prompt: with --image its caption (default: IMAGE.txt "
                               "beside it, or its name); without --image the scene to create (text to 3D through "
                               "--text-to-image or --config's text_to_image)"),
    text_to_image: Path = typer.Option(None, "--text-to-image", help="local diffusers text-to-image pipeline folder "
                                       "for --prompt without --image (PixArt, SD3, FLUX, SDXL, Sana)"),
    config: Path = typer.Option(None, "--config", help="YAML whose depth and generator sections set the depth "
                                "model and the video model (e.g. depth: {backend: transformers, model_path: DIR}; "
                                "default: the planar depth prior and the warp_only teacher) and whose text_to_image "
                                "section configures text to 3D (`lyra example-config text_prompts` prints one)"),
    depth: Path = typer.Option(None, "--depth", help="depth map of --image: an (H,W) .npy of z-depth in metres or a "
                               "16-bit PNG in millimetres, at the image's size or aspect ratio (default: "
                               "IMAGE.depth.npy beside it, else --config's depth section, else the planar prior)"),
    checkpoint: str = typer.Option(None, "--checkpoint", help="decoder model.safetensors, or a store whose newest "
                                   "finished `lyra train` is used (default: --store's newest finished training, "
                                   "else the decoder shipped with the package)"),
    store: str = typer.Option(DEFAULT_STORE, "--store", help="store whose newest finished `lyra train` is used when "
                              "--checkpoint is not given (skipped when it is not a store or has none)"),
    out: Path = typer.Option(Path("reconstruction"), "--out", help="output folder (its store/ holds the scene)"),
    preset: str = typer.Option("default", "--preset", help="video format preset of the generated scene"),
    html: bool = typer.Option(False, "--html", help="also write a self-contained HTML viewer (needs node/npx)"),
    prune_ratio: float = PruneOpt,
    min_opacity: float = MinOpacityOpt,
    layout: str = LayoutOpt,
    smoothing: float = SmoothingOpt,
    viewer_smoothing: float = ViewerSmoothingOpt,
    backdrop: str = BackdropOpt,
    refine_steps: int = typer.Option(None, "--refine", help="then refine the Gaussians against the generated "
                                     "frames for this many steps (like `lyra refine`; resumable in OUT/store)"),
) -> None:
    """One image (or a text prompt) -> camera trajectories -> teacher videos -> decoder -> Gaussians (PLY) + a
    rendered strip (+ an HTML viewer). Content-addressed: with the same inputs and options as the finished run
    that wrote OUT/<image>.ply (its OUT/<image>.export.json), nothing is computed or written."""
    _setup_env()
    from lyra_pipeline.config import load_config_file as _load_config
    from lyra_pipeline.outputs import output_key, reconstruct_inputs, reconstruct_sections, up_to_date, up_to_date_lines

    try:
        tree = _load_config(config)[1] if config else {}
        if depth is not None and image is None:
            raise LyraInputError("--depth: a depth map goes with --image (text to 3D makes its own first frame)")
        if image is None and prompt is None:
            raise LyraInputError("reconstruct needs --image IMAGE or --prompt TEXT")
        if image is not None and not image.is_file():  # the input and the text-to-image model: before torch loads
            raise LyraInputError(f"{image}: image not found")
        t2i = tree.get("text_to_image")
        if image is None and prompt.strip() and text_to_image is None and (t2i is None or isinstance(t2i, dict)
                                                                          and not t2i.get("model_path")):
            raise LyraConfigError(f"reconstruct --prompt needs a text-to-image pipeline: {TEXT_TO_IMAGE_HELP}")
    except LyraError as exc:
        _fail(exc)
    sections = reconstruct_sections(tree)
    export_options = _export_options(prune_ratio, min_opacity, layout, smoothing, backdrop, viewer_smoothing)
    if image is not None and (refine_steps is None or refine_steps >= 1):  # checked before any heavy import
        inputs = reconstruct_inputs(image, prompt=prompt, depth=depth, preset=preset, sections=sections,
                                    checkpoint=checkpoint, store=store, options=export_options,
                                    refine={"steps": refine_steps} if refine_steps is not None else None, html=html)
        done = up_to_date(out / f"{image.stem}.ply", output_key(inputs) if inputs is not None else None)
        if done is not None:
            for line in up_to_date_lines(out / f"{image.stem}.ply", done):
                _log(line)
            return
    from lyra_pipeline.reconstruct import ExportOptions, export_summary, reconstruct_image, reconstruct_text
    from lyra_pipeline.refine import RefineConfig

    try:
        options = ExportOptions(**export_options)
        if refine_steps is not None and refine_steps < 1:
            raise LyraInputError(f"--refine: expected an integer >= 1 (optimiser steps), got {refine_steps}")
        refine_config = RefineConfig(steps=refine_steps) if refine_steps is not None else None
        common = {"checkpoint": checkpoint, "store": store, "preset": preset, "html": html, "log": _log,
                  "options": options, "refine": refine_config, "sections": sections}
        stop = _interruptible("reconstruction stopped; run the same command again: finished stages and refinement "
                              "checkpoints are reused (the same bytes as an uninterrupted run)")
        if image is not None:
            with stop:
                res = reconstruct_image(image, out, prompt=prompt, depth=depth, **common)
        elif prompt is not None:
            settings = dict(tree.get("text_to_image", {}))
            if text_to_image is not None:
                settings["model_path"] = str(text_to_image)
            with stop:
                res = reconstruct_text(prompt, out, text_to_image=settings, **common)
        else:
            raise LyraInputError("reconstruct needs --image IMAGE or --prompt TEXT")
    except LyraError as exc:
        _fail(exc)
    if "up to date" in res.notes:
        for line in up_to_date_lines(res.ply, {"made_with": res.fallbacks, "outputs": {p.name: "" for p in res.files}}):
            _log(line)
        return
    console.print(export_summary(res))


@app.command()
def report(
    store: str = StoreOpt,
    out: Path = typer.Option(Path("lyra_report"), "--out", help="output folder (index.html, self-contained)"),
    scenes: int = typer.Option(2, "--scenes", min=0, help="contact sheets of the first N scenes"),
) -> None:
    """Self-contained HTML report: dataset metrics and plots, decoder training and validation, contact sheets."""
    _setup_env()
    try:
        RunStore(store, create=False)  # checked before matplotlib and torch load
        if out.exists() and not out.is_dir():
            raise LyraInputError(f"{out}: --out is an existing file; expected an output folder (new or existing)")
        from lyra_pipeline.report import build_report

        path = build_report(store, out, scenes=scenes)
    except LyraError as exc:
        _fail(exc)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command()
def view(
    target: str = typer.Argument(..., help="scene id in --store (a dynamic scene plays with a time slider), a .ply "
                                 "file, or a <stem>.sequence.json from `export-ply --times`"),
    store: str = StoreOpt,
    checkpoint: str = typer.Option(None, "--checkpoint", help="decoder model.safetensors (default: the store's "
                                   "newest finished training, else the decoder shipped with the package; without "
                                   "any the input RGB-D point cloud is shown)"),
    host: str = typer.Option("127.0.0.1", "--host", help="bind address (0.0.0.0 exposes it to your network)"),
    port: int = typer.Option(8080, "--port"),
) -> None:
    """Interactive 3D view in the browser (viser): Gaussians, camera trajectories as frustums, the input image; a
    time slider and play toggle for dynamic scenes and Gaussian sequences."""
    _setup_env()
    try:
        kind = _view_target(target, store)  # before torch and viser load
        from lyra_pipeline.viewer import check_address, start_viewer

        check_address(host, port)  # before any decoding: a bad port killed viser's thread and the process hung
        if kind == "file":
            server = start_viewer(ply=target, host=host, port=port)
        else:
            server = start_viewer(store=store, scene=target, checkpoint=checkpoint, host=host, port=port, log=_log)
    except LyraError as exc:
        _fail(exc)
    console.print(f"viewer on http://{host}:{server.get_port()} (Ctrl-C to stop)")
    try:
        server.sleep_forever()
    except KeyboardInterrupt:
        server.stop()


VIEW_TARGETS = "a .ply file, a <stem>.sequence.json from `lyra export-ply --times`, or a scene id in --store"


def _view_target(target: str, store: str) -> str:
    """``lyra view TARGET``: "file" (an existing .ply / .sequence.json) or "scene" (a scene of ``store``); one
    ``LyraInputError`` line naming TARGET and the accepted forms else."""
    path = Path(target)
    if target.lower().endswith((".ply", ".sequence.json")):
        if path.is_dir():
            raise LyraInputError(f"{target}: is a folder; expected {VIEW_TARGETS}")
        if not path.is_file():
            raise LyraInputError(f"{target}: file not found; expected {VIEW_TARGETS}")
        return "file"
    try:
        _check_local_store(store)
        scenes, why = _local_scene_ids(store), None  # "no such scene" before Zarr loads; a listed one: confirmed
        if scenes is None or target in scenes:
            scenes = RunStore(store, create=False).scene_ids()
    except LyraError as exc:
        scenes, why = [], str(exc)
    if target in scenes:
        return "scene"
    what = ("a folder, " if path.is_dir() else "") + "not a .ply or .sequence.json file"
    if why is None:
        shown = ", ".join(scenes[:12]) + (" ..." if len(scenes) > 12 else "")
        where = f"nor a scene of {store} (its scenes: {shown or 'none'})"
    else:
        where = f"nor a scene id ({why})"
    raise LyraInputError(f"{target}: {what}, {where}; expected {VIEW_TARGETS}")


@app.command("example-config")
def example_config(
    name: str = typer.Argument(None, help="an example, e.g. text_prompts, wan_local, lyra_compat, train/fuse "
                               "(without it: the list)"),
    out: Path = typer.Option(None, "--out", help="write it to this new .yaml file instead of printing it"),
) -> None:
    """The example config files shipped with the package: list them, print one, or write it (--out) to edit and
    pass as --config."""
    from lyra_pipeline.example_configs import example_names, example_summary, example_text

    try:
        if name is None:
            for example in example_names():
                sys.stdout.write(f"{example:<18} {example_summary(example)}\n")  # (``out`` is the path here)
            return
        text = example_text(name)
        if out is not None:
            check_new_file(out, "--out", f"{name.rsplit('/', 1)[-1].removesuffix('.yaml')}.yaml")
            if out.suffix.lower() not in (".yaml", ".yml"):
                raise LyraInputError(f"{out}: --out must end in .yaml or .yml")
            if out.exists():
                raise LyraInputError(f"{out}: exists; choose another --out (nothing is overwritten)")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8")
            console.print(f"wrote {out}; pass it as --config {out}", markup=False, highlight=False)
            return
    except LyraError as exc:
        _fail(exc)
    sys.stdout.write(text)


server_app = typer.Typer(help="A Prefect server on PostgreSQL (production-like; `lyra run` needs none).")
app.add_typer(server_app, name="server")


@server_app.command("start")
def server_start(
    db_url: str = typer.Option(None, "--db-url", help="postgresql+asyncpg://USER@HOST:PORT/NAME (created if missing; "
                               "default postgres@127.0.0.1:5432/lyra_prefect)"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(4200, "--port"),
) -> None:
    """Create the database if needed and run `prefect server start` on it (Ctrl-C stops it)."""
    from lyra_pipeline.server import DEFAULT_DB_URL, start_server

    url = db_url or DEFAULT_DB_URL
    try:
        proc = start_server(url, host, port)
    except LyraError as exc:
        _fail(exc)
    console.print(f"Prefect server on http://{host}:{port} (database {url.rsplit('/', 1)[-1]}); in other shells:\n"
                  f"  export PREFECT_API_URL=http://{host}:{port}/api\n  prefect work-pool create lyra-process "
                  "--type process; prefect deploy --all; prefect worker start --pool lyra-process")
    try:
        proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except KeyboardInterrupt:  # Ctrl-C before a command's own handling began (while checking its inputs)
        from lyra_pipeline.__main__ import INTERRUPTED_EARLY

        sys.stderr.write(INTERRUPTED_EARLY)
        sys.exit(130)


if __name__ == "__main__":
    main()
