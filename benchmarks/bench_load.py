"""Load test: generate-dataset deployments on a PostgreSQL-backed Prefect server with 2 process workers.

Starts ``lyra server start``'s server on a fresh database, deploys ``prefect.yaml``, starts two process workers
and triggers two runs of the ``generate-dataset`` deployment on ONE store with ``--scenes`` smoke scenes each
(the per-scene leases split the work between them). Reports throughput (scenes/min), the task runs' scheduling
latency (start time - expected start time) from the server's API, and whether any task run stalled (a
"database is locked"-style pause shows up as a large latency). Printed and written as JSON; never asserted.

    python benchmarks/bench_load.py --scenes 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lyra_pipeline.server import drop_database, start_server  # noqa: E402
from lyra_pipeline.storage import RunStore  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect(args: list[str], env: dict, timeout: float = 600) -> str:
    proc = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"prefect {args} failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    return proc.stdout


async def task_run_latencies(api: str, flow_run_ids: list[str]) -> list[float]:
    """Seconds between each task run's expected and actual start (the server's scheduling latency)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = []
    with temporary_settings({PREFECT_API_URL: api}):
        async with get_client() as client:
            offset = 0
            while True:
                runs = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)), limit=200, offset=offset)
                if not runs:
                    break
                out += [(r.start_time - r.expected_start_time).total_seconds() for r in runs
                        if r.start_time and r.expected_start_time]
                offset += len(runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    db = f"postgresql+asyncpg://postgres@127.0.0.1:5432/lyra_load_{os.getpid()}"
    port = free_port()
    server = start_server(db, port=port, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env_overrides={"PREFECT_UI_ENABLED": "false"})
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_LOGGING_LEVEL": "WARNING", "PYTHONPATH": str(REPO)}
    workers = []
    try:
        prefect(["work-pool", "create", "lyra-process", "--type", "process"], env)
        prefect(["deploy", "--all"], env)
        workers = [subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "lyra-process",
                                     "--limit", "1"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL) for _ in range(args.workers)]
        with tempfile.TemporaryDirectory() as tmp:
            store = f"{tmp}/store"
            params = json.dumps({"store": store, "preset": "smoke",
                                 "overrides": {"scenes": {"num_scenes": args.scenes}}})
            t0 = time.time()
            ids = []
            for _ in range(args.workers):
                out = prefect(["deployment", "run", "generate-dataset/generate-dataset", "--params", params], env)
                ids += re.findall(r"UUID: ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})", out)[-1:]
            deadline = t0 + 4 * 3600
            from prefect.client.orchestration import get_client
            from prefect.settings import PREFECT_API_URL, temporary_settings

            async def states() -> list[str]:
                with temporary_settings({PREFECT_API_URL: api}):
                    async with get_client() as client:
                        return [(await client.read_flow_run(i)).state.type.value for i in ids]

            while time.time() < deadline:
                st = asyncio.run(states())
                if all(s in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for s in st):
                    break
                time.sleep(5)
            wall = time.time() - t0
            rows = RunStore(store, create=False).read_manifest().to_pylist()
            lat = asyncio.run(task_run_latencies(api, ids))
            result = {
                "scenes": args.scenes, "workers": args.workers, "flow_runs": st, "wall_s": wall,
                "scenes_per_min": 60 * args.scenes / wall, "units_done": sum(r["status"] == "done" for r in rows),
                "units_expected": args.scenes * (2 + 5 * 6), "task_runs": len(lat),
                "task_latency_median_s": statistics.median(lat) if lat else None,
                "task_latency_p99_s": sorted(lat)[int(0.99 * (len(lat) - 1))] if lat else None,
                "task_latency_max_s": max(lat) if lat else None,
            }  # fmt: skip
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
        server.terminate()
        server.wait(30)
        drop_database(db)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
