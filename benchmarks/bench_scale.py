"""Benchmark: operations at scale. Printed and written as JSON, never asserted.

(a) Prefect overhead: flow wall time vs the sum of the stage durations recorded in the manifest (thread runner,
    1 worker), as % of stage time; and per scene task: the scene tasks' run times as the Prefect server recorded
    them (leases, manifest writes, task bookkeeping included) vs the same stage durations.
(b) Dask: the same batch on a LocalCluster of 1 vs 2 single-threaded worker processes (2 cores): whole-flow wall
    time, and the span from the first scene task's start to the last one's end (server-recorded), which leaves
    out the fixed cost of a run (flow start, cluster start with the workers' imports, teardown: ~6 s); and the
    machine's own ceiling for this work (the scene function in 1 process vs 2 at once, no Prefect or Dask).
(c) Resume: a re-run of the finished batch as % of the first run's wall time: the flow called again (vs the flow's
    first call), and `lyra run` in a new process (vs `lyra run`'s first run; the re-run answers from the manifest
    without starting Prefect or importing torch).
(d) Status at scale: ``read_manifest`` + per-stage counts over a synthetic store of ``--status-scenes`` scenes
    x 6 trajectories (per-scene manifest files + the compacted index the flows write), cold and with 100
    scenes changed since the index; and the whole `lyra status` command (counts, units left, last run) on it.
    ``--direct-index`` (1M scenes): the index written from the synthetic rows (what ``compact_manifest`` writes,
    without re-reading 1M files), stamped complete under the smoke plan; then `lyra run` on it answers "nothing
    to do" from the index footer (timed in this process and as a new process).
(e) Dask workers started separately (`dask scheduler` + `dask worker` processes, `lyra run --dask-address`'s
    runner) vs the LocalCluster of (b), 1 and 2 single-threaded workers, alternated in one run.

    python benchmarks/bench_scale.py --scenes 8 --status-scenes 100000
    python benchmarks/bench_scale.py --only-status --status-scenes 1000000 --direct-index --skip-no-index
    python benchmarks/bench_scale.py --only-dask-separate --scenes 8
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry writes racing the harness DB

from lyra_pipeline.storage import MANIFEST_SCHEMA, STAGES, RunStore  # noqa: E402

LAST_FLOW_RUN: dict = {}


def run_batch(store: str, scenes: int, runner) -> float:
    from flows.generate_dataset import generate_dataset

    flow = generate_dataset.with_options(task_runner=runner)
    t0 = time.perf_counter()
    state = flow(store=store, preset="smoke", overrides={"scenes": {"num_scenes": scenes}}, return_state=True)
    wall = time.perf_counter() - t0
    state.result()
    LAST_FLOW_RUN["id"] = state.state_details.flow_run_id
    return wall


def scene_task_runs(flow_run_id) -> list:
    """The flow run's scene task runs as the Prefect server recorded them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [r for r in runs if r.task_key.startswith("process_scene") or r.name.startswith("scene-")]


def scene_task_span(flow_run_id) -> float:
    """Seconds from the first scene task's start to the last one's end (the batch without the flow's and the
    cluster's start and teardown)."""
    runs = scene_task_runs(flow_run_id)
    return (max(r.end_time for r in runs) - min(r.start_time for r in runs)).total_seconds()


def scene_task_seconds(flow_run_id) -> float:
    """Sum over the flow run's scene tasks of their run time as the Prefect server recorded it."""
    return sum((r.end_time - r.start_time).total_seconds() for r in scene_task_runs(flow_run_id))


TRAJECTORIES = ["left", "right", "up", "zoom_out", "zoom_in", "clockwise"]  # the smoke preset's six paths


def synthetic_rows(first: int, count: int) -> pa.Table:
    """Manifest rows of scenes ``first .. first+count-1`` (every unit done: 2 scene-level + 6 paths x 6 stages),
    in scene order, built column-wise (38M rows at 1M scenes)."""
    import numpy as np

    units = [("", s) for s in STAGES[:2]] + [(t, s) for t in TRAJECTORIES for s in STAGES[2:]]
    per, n = len(units), count
    sids = pa.array([f"proc-{i:07d}" for i in range(first, first + n)], pa.string())
    take = pa.array(np.repeat(np.arange(n, dtype=np.int64), per))
    tile = pa.array(np.tile(np.arange(per, dtype=np.int64), n))
    return pa.table({"scene_id": sids.take(take),
                     "trajectory": pa.array([u[0] for u in units], pa.string()).take(tile),
                     "stage": pa.array([u[1] for u in units], pa.string()).take(tile),
                     "status": pa.array(["done"] * (n * per), pa.string()),
                     "key": pa.array(["0" * 32] * (n * per), pa.string()),
                     "duration_s": pa.array(np.ones(n * per)), "error": pa.array([""] * (n * per), pa.string()),
                     "run_id": pa.array(["bench"] * (n * per), pa.string()),
                     "updated_at": pa.array(np.full(n * per, time.time()))}, schema=MANIFEST_SCHEMA)


def synthetic_store(path: Path, scenes: int, *, chunk: int = 10_000) -> RunStore:
    """A store of ``scenes`` finished smoke scenes as `lyra run` leaves one: one manifest file per scene (the same
    layout the flows write), the scene list and the dataset record (smoke preset, ``num_scenes``). Keys are not
    the real ones: only status and `lyra run`'s index answer read this store."""
    from lyra_pipeline.store.dataset import DATASET_FILE, dataset_doc

    store = RunStore(path)
    (path / "manifest").mkdir(exist_ok=True)
    per = 2 + len(TRAJECTORIES) * len(STAGES[2:])
    for first in range(0, scenes, chunk):
        table = synthetic_rows(first, min(chunk, scenes - first))
        for j in range(table.num_rows // per):
            part = table.slice(j * per, per)
            buf = io.BytesIO()
            pq.write_table(part, buf)
            (path / "manifest" / f"{part['scene_id'][0].as_py()}.parquet").write_bytes(buf.getvalue())
    store.write_file(DATASET_FILE, dataset_doc("smoke", {"scenes": {"num_scenes": scenes}}, scenes))
    store.write_prompts([{"scene_id": f"proc-{i:07d}", "text": f"a room {i}", "image_path": None,
                          "content_sha": "0" * 64, "seed": i, "source": "procedural"} for i in range(scenes)])
    return store


def direct_index(store: RunStore, scenes: int) -> int:
    """The index ``compact_manifest`` would write after a run that finished every scene (counts, the quiet
    folder's mtime, the completion stamp of the smoke plan), written from the synthetic rows in memory instead of
    re-reading every per-scene file (``compact_manifest`` at 1M scenes reads 1M files: ~25 min here)."""
    import hashlib

    from lyra_pipeline.config import build_config
    from lyra_pipeline.stages import plan_fingerprint
    from lyra_pipeline.store import runstore

    runstore.INDEX_QUIET_MIN_SCENES = min(runstore.INDEX_QUIET_MIN_SCENES, scenes)  # small trial stores too
    path = store._path("manifest")
    quiet = store._quiet_folder_mtime(path)
    assert quiet is not None, "the manifest folder did not stay quiet"
    listing = store._listing_mtimes(path)
    cfg = build_config("smoke", {"scenes": {"num_scenes": scenes}})
    stamp = {"plan": plan_fingerprint(cfg), "prompts": hashlib.sha256(store.read_file("prompts.parquet")).hexdigest(),
             "scenes": scenes}
    return store.write_manifest_index(synthetic_rows(0, scenes), listing, quiet_mtime_ns=quiet, complete=stamp)


def cli_status(path: Path) -> str:
    """`lyra status --store PATH` in this process (what a user runs, without the interpreter start)."""
    from typer.testing import CliRunner

    from lyra_pipeline.cli import app

    result = CliRunner().invoke(app, ["status", "--store", str(path)])
    assert result.exit_code == 0, result.output
    return result.output


def status(store: RunStore) -> Counter:
    """What `lyra status` computes: units per (stage, status)."""
    return Counter(store.manifest_counts())


def timed_cli(args: list[str], timeout: float = 120) -> tuple[float, str]:
    """A `lyra` command in a new process (interpreter start and imports included): seconds and output."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lyra_pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return wall, proc.stdout + proc.stderr


def status_part(args, result: dict) -> None:
    """(d): status over a synthetic store of ``--status-scenes`` scenes, without and with the index; `lyra run`'s
    "nothing to do" on it (stamped complete under the smoke plan)."""
    result["status_scenes"] = args.status_scenes
    result["load_before"] = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        big = Path(tmp) / "big"
        t0 = time.perf_counter()
        store = synthetic_store(big, args.status_scenes)
        result["d_synthetic_write_s"] = time.perf_counter() - t0
        counts = None
        if not args.skip_no_index:
            t0 = time.perf_counter()
            counts = status(store)
            result["d_status_no_index_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if args.direct_index:
            direct_index(store, args.status_scenes)
            result["d_direct_index_s"] = time.perf_counter() - t0  # quiet wait (2 s) + listing + write
        else:
            store.compact_manifest()
            result["d_compact_s"] = time.perf_counter() - t0
        result["d_index_mb"] = (big / "manifest_index.parquet").stat().st_size / 1e6
        t0 = time.perf_counter()
        counts2 = status(RunStore(big))
        result["d_status_s"] = time.perf_counter() - t0
        assert counts is None or counts == counts2
        result["d_rows"] = sum(counts2.values())
        cli_status(big)  # warm: the CLI module's imports are not the status computation
        t0 = time.perf_counter()
        text = cli_status(big)
        result["d_cli_status_s"] = time.perf_counter() - t0
        assert f"{args.status_scenes} scenes" in text, text
        result["d_cli_status_process_s"], text = timed_cli(["status", "--store", str(big)])
        assert f"{args.status_scenes} scenes" in text, text
        if args.direct_index:  # stamped complete: `lyra run` answers from the index footer
            from lyra_pipeline import cli

            t0 = time.perf_counter()
            assert cli._finished_from_index(str(big), *(None,) * 8)
            result["d_run_nothing_to_do_s"] = time.perf_counter() - t0
            result["d_run_nothing_to_do_process_s"], text = timed_cli(["run", "--store", str(big)])
            assert f"nothing to do: all {args.status_scenes} scenes" in text, text
        for i in range(100):  # a run touches 100 scenes after the index was written (as it writes: a rename)
            p = big / "manifest" / f"proc-{i:07d}.parquet"
            tmp_file = p.with_suffix(".tmp")
            tmp_file.write_bytes(p.read_bytes())
            os.replace(tmp_file, p)
        t0 = time.perf_counter()
        status(RunStore(big))
        result["d_status_100_changed_s"] = time.perf_counter() - t0
        result["d_cli_status_100_changed_process_s"], _ = timed_cli(["status", "--store", str(big)])
    result["load_after"] = os.getloadavg()


def scenes_direct(job: tuple[str, int, int]) -> float:
    """Seconds to run scenes ``first .. first+count-1`` of the smoke batch by calling the scene task's function
    (no Prefect, no Dask) into a new store; the imports are not timed."""
    store_url, first, count = job
    from lyra_pipeline.config import build_config
    from lyra_pipeline.planning import scene_records
    from tasks.sdg import process_scene

    cfg = build_config("smoke", {"scenes": {"num_scenes": first + count}})
    RunStore(store_url)
    records = scene_records(cfg)[first:first + count]
    t0 = time.perf_counter()
    for record in records:
        process_scene.fn(store_url, cfg, record, "direct")
    return time.perf_counter() - t0


def hardware_ceiling(tmp: str, count: int = 3) -> float:
    """What 2 processes can gain on this machine for this work: the same stage work (``count`` scenes) in one
    process (before and after), then in two at once; ceiling = 2 t1 / max(t2). Shared caches, memory bandwidth
    and clock limits make it less than 2 on many machines."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(scenes_direct, [(f"{tmp}/hw-w0", 0, 1), (f"{tmp}/hw-w1", 0, 1)])  # imports and warm-up
        before = pool.map(scenes_direct, [(f"{tmp}/hw-1a", 1, count)])[0]
        two = pool.map(scenes_direct, [(f"{tmp}/hw-2a", 1, count), (f"{tmp}/hw-2b", 1 + count, count)])
        after = pool.map(scenes_direct, [(f"{tmp}/hw-1b", 1, count)])[0]
    return (before + after) / max(two)


def dask_part(args, result: dict, tmp: str) -> None:
    """(b): 1 vs 2 workers, alternated ``--dask-repeats`` times (the machine drifts; medians of each)."""
    import statistics

    from lyra_pipeline.cli import make_task_runner

    d1, d2, s1, s2 = [], [], [], []
    for i in range(args.dask_repeats):
        d1.append(run_batch(f"{tmp}/d1-{i}", args.scenes, make_task_runner(1, dask=True)))
        s1.append(scene_task_span(LAST_FLOW_RUN["id"]))
        d2.append(run_batch(f"{tmp}/d2-{i}", args.scenes, make_task_runner(2, dask=True)))
        s2.append(scene_task_span(LAST_FLOW_RUN["id"]))
    result["b_dask_1_worker_s"], result["b_dask_2_workers_s"] = d1, d2
    result["b_speedup"] = statistics.median(d1) / statistics.median(d2)
    result["b_speedup_per_pair"] = [a / b for a, b in zip(d1, d2, strict=True)]
    result["b_speedup_median_pair"] = statistics.median(result["b_speedup_per_pair"])  # robust to the drift
    # the same runs without their fixed cost (flow start, cluster start and worker imports, teardown)
    result["b_task_span_1_worker_s"], result["b_task_span_2_workers_s"] = s1, s2
    result["b_task_span_speedup"] = statistics.median(s1) / statistics.median(s2)
    result["b_fixed_cost_s"] = [d - s for d, s in zip(d1 + d2, s1 + s2, strict=True)]
    result["b_hardware_ceiling"] = hardware_ceiling(tmp)


class SeparateCluster:
    """`dask scheduler` and ``workers`` `dask worker` processes started separately (as on real machines: each its
    own process tree and session, single-threaded workers), torn down with their sessions."""

    def __init__(self, workers: int, tmp: str) -> None:
        import socket
        import subprocess

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"tcp://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True, "env": env}
        self.procs = [subprocess.Popen(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                        "--dashboard-address", ":0", "--no-show"], **quiet)]
        for i in range(workers):
            extra = ["--resources", "GPU=1"] if i == 0 else []  # as a GPU machine's worker would (no GPU stages)
            self.procs.append(subprocess.Popen(["dask", "worker", self.address, "--name", f"w{i}", "--nthreads", "1",
                                                "--nworkers", "1", "--dashboard-address", ":0", "--local-directory",
                                                f"{tmp}/dask-w{i}", *extra], **quiet))
        from distributed import Client

        with Client(self.address, timeout=120) as client:
            client.wait_for_workers(workers, timeout=120)

    def close(self) -> None:
        import signal

        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except Exception:  # noqa: BLE001 - a worker its nanny could not end
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def dask_separate_part(args, result: dict, tmp: str) -> None:
    """(e): the same batch on separately started `dask worker` processes (1 vs 2; `lyra run --dask-address`'s
    runner), alternated with the LocalCluster of (b) in the same run, so both pairs see the same machine. The
    workers are started before the timing (a real cluster is up before a run); the LocalCluster's start is in its
    wall time, so the comparison is the task span (first scene task's start to the last one's end)."""
    import statistics

    from lyra_pipeline.cli import make_task_runner

    rows: dict[str, list[float]] = {k: [] for k in ("local1", "local2", "sep1", "sep2", "sep1_span", "sep2_span",
                                                     "local1_span", "local2_span")}
    for i in range(args.dask_repeats):
        for n in (1, 2):
            rows[f"local{n}"].append(run_batch(f"{tmp}/l{n}-{i}", args.scenes, make_task_runner(n, dask=True)))
            rows[f"local{n}_span"].append(scene_task_span(LAST_FLOW_RUN["id"]))
            cluster = SeparateCluster(n, tmp)
            try:
                rows[f"sep{n}"].append(run_batch(f"{tmp}/s{n}-{i}", args.scenes,
                                                 make_task_runner(n, dask_address=cluster.address)))
                rows[f"sep{n}_span"].append(scene_task_span(LAST_FLOW_RUN["id"]))
            finally:
                cluster.close()
    result["e_local_1_worker_s"], result["e_local_2_workers_s"] = rows["local1"], rows["local2"]
    result["e_local_task_span_1_s"], result["e_local_task_span_2_s"] = rows["local1_span"], rows["local2_span"]
    result["e_separate_1_worker_s"], result["e_separate_2_workers_s"] = rows["sep1"], rows["sep2"]
    result["e_separate_task_span_1_s"], result["e_separate_task_span_2_s"] = rows["sep1_span"], rows["sep2_span"]
    med = statistics.median
    result["e_local_speedup"] = med(rows["local1"]) / med(rows["local2"])
    result["e_local_task_span_speedup"] = med(rows["local1_span"]) / med(rows["local2_span"])
    result["e_separate_speedup"] = med(rows["sep1"]) / med(rows["sep2"])
    result["e_separate_task_span_speedup"] = med(rows["sep1_span"]) / med(rows["sep2_span"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--status-scenes", type=int, default=100_000)
    ap.add_argument("--skip-dask", action="store_true")
    ap.add_argument("--only-status", action="store_true", help="only (d)")
    ap.add_argument("--skip-no-index", action="store_true", help="(d): skip the slow read without the index")
    ap.add_argument("--direct-index", action="store_true", help="(d): write the index (with the completion stamp) "
                    "from the synthetic rows instead of `compact_manifest` re-reading every per-scene file; also "
                    "times `lyra run`'s nothing-to-do answer")
    ap.add_argument("--tmp", default=None, help="(d): folder for the synthetic store (default: the system's)")
    ap.add_argument("--only-dask", action="store_true", help="only (b)")
    ap.add_argument("--only-dask-separate", action="store_true", help="only (e): separately started workers vs "
                    "the LocalCluster, 1 and 2 workers")
    ap.add_argument("--dask-repeats", type=int, default=1, help="(b): alternating 1/2-worker pairs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect.testing.utilities import prefect_test_harness

    result: dict = {"scenes": args.scenes}
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        if args.only_dask_separate:
            result["load_before"] = os.getloadavg()
            dask_separate_part(args, result, tmp)
            result["load_after"] = os.getloadavg()
            print(json.dumps(result, indent=2))
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=2))
            return
        if args.only_dask:
            dask_part(args, result, tmp)
            print(json.dumps(result, indent=2))
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=2))
            return
        if args.only_status:
            status_part(args, result)
            print(json.dumps(result, indent=2))
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=2))
            return
        store = f"{tmp}/a"
        wall = run_batch(store, args.scenes, ThreadPoolTaskRunner(max_workers=1))
        rows = RunStore(store).read_manifest().to_pylist()
        stage_s = sum(r["duration_s"] for r in rows)
        result["a_flow_wall_s"], result["a_stage_s"] = wall, stage_s
        result["a_prefect_overhead_pct"] = 100 * (wall - stage_s) / stage_s  # the whole flow, incl. its start/end
        task_s = scene_task_seconds(LAST_FLOW_RUN["id"])  # the scene tasks alone (server-recorded run times)
        result["a_scene_task_s"] = task_s
        result["a_scene_task_overhead_pct"] = 100 * (task_s - stage_s) / stage_s
        resume = run_batch(store, args.scenes, ThreadPoolTaskRunner(max_workers=1))
        result["c_resume_s"], result["c_resume_pct"] = resume, 100 * resume / wall
        # `lyra run` as a user runs it, first run and re-run of the finished batch, each a new process (interpreter
        # start and, for the first run, the temporary Prefect server included); the re-run answers from the
        # manifest without Prefect or torch
        import subprocess

        cli = [sys.executable, "-m", "lyra_pipeline.cli", "run", "--preset", "smoke", "--num-scenes", str(args.scenes),
               "--store", f"{tmp}/c"]
        t0 = time.perf_counter()
        subprocess.run(cli, capture_output=True, text=True, check=True)
        result["c_cli_first_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = subprocess.run(cli, capture_output=True, text=True, check=True)
        result["c_cli_resume_s"] = time.perf_counter() - t0
        result["c_cli_resume_pct"] = 100 * result["c_cli_resume_s"] / result["c_cli_first_s"]
        assert "nothing to do" in out.stdout + out.stderr, out.stdout + out.stderr
        if not args.skip_dask:
            dask_part(args, result, tmp)
    status_part(args, result)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
