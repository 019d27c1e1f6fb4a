"""`lyra run --dask-address` on a Dask cluster started like a real one (issue 29, multi-node): `dask scheduler` and
two `dask worker` processes started separately (one offering ``--resources GPU=1``, as a GPU machine's would), each
in a session of its own. One worker machine dies mid-run (its nanny and worker SIGKILLed together, holding a scene):
the scheduler reschedules its scenes on the other, the run finishes, the store's arrays and tables are the same bytes
as a one-process run's, and `lyra status` counts every unit done. Every process started is ended afterwards."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SCENES = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
            "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}


class Cluster:
    """A scheduler and named workers, each its own session (``killpg`` ends a nanny with its worker process)."""

    def __init__(self, tmp: Path, extra_env: dict[str, str]) -> None:
        self.tmp, self.port, self.env = tmp, free_port(), {**env(), **extra_env}
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str]) -> None:
        log = (self.tmp / f"{name}.log").open("w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True, cwd=self.tmp)

    def scheduler(self) -> None:
        self.start("scheduler", ["dask", "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                 "--dashboard-address", ":0", "--no-show"])

    def worker(self, name: str, *extra: str) -> None:
        self.start(name, ["dask", "worker", self.address, "--name", name, "--nthreads", "1", "--nworkers", "1",
                          "--dashboard-address", ":0", "--local-directory", str(self.tmp / name), *extra])

    def wait_for_workers(self, n: int, timeout: float = 120) -> None:
        from distributed import Client

        with Client(self.address, timeout=timeout) as client:
            client.wait_for_workers(n, timeout=timeout)

    def workers_pids(self) -> dict[str, set[int]]:
        """Every live pid of each worker's session (nanny and worker process)."""
        out: dict[str, set[int]] = {}
        for name, proc in self.procs.items():
            pids = set()
            for d in Path("/proc").iterdir():
                if d.name.isdigit():
                    try:
                        if os.getsid(int(d.name)) == proc.pid:
                            pids.add(int(d.name))
                    except OSError:
                        continue
            out[name] = pids
        return out

    def kill(self, name: str) -> None:
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait()

    def close(self) -> list[int]:
        """End every process; returns the pids still alive after (none)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 20
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for proc in self.procs.values():  # a worker process its nanny could not end
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        return sorted(p for pids in self.workers_pids().values() for p in pids)


@pytest.fixture
def cluster(tmp_path, prefect_server_env):
    c = Cluster(tmp_path, prefect_server_env)  # the workers run Prefect task runs: they report to its server
    c.scheduler()
    c.worker("gpu-node", "--resources", "GPU=1")
    c.worker("cpu-node")
    yield c
    c.close()


def lyra(*args: str, extra_env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lyra_pipeline.cli", *args], capture_output=True, text=True,
                          env={**env(), **(extra_env or {})}, timeout=timeout)


def store_bytes(root: Path) -> dict[str, bytes]:
    """Every array file (chunks and metadata) and the scene list, by path."""
    out = {}
    for p in sorted((root / "scenes.zarr").rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
    out["prompts.parquet"] = (root / "prompts.parquet").read_bytes()
    out["dataset.json"] = (root / "dataset.json").read_bytes()
    return out


def units(root: Path) -> list[tuple]:
    """(scene, trajectory, stage, status, key) of every unit, from the per-scene manifest files."""
    rows = []
    for p in sorted((root / "manifest").glob("*.parquet")):
        if p.name == "manifest_index.parquet":
            continue
        rows += [(r["scene_id"], r["trajectory"], r["stage"], r["status"], r["key"])
                 for r in pq.read_table(p).to_pylist()]
    return sorted(rows)


def status_rows(text: str) -> dict[str, tuple[int, ...]]:
    """`lyra status`'s table: stage -> (done, running, failed, units)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 5 and cells[1].isdigit():
            rows[cells[0]] = tuple(int(c) for c in cells[1:])
    return rows


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, prefect_server_env):
    store = tmp_path_factory.mktemp("dask-ref") / "store"
    res = lyra("run", "--preset", "smoke", "--num-scenes", str(SCENES), "--store", str(store), "--workers", "1",
               extra_env=prefect_server_env)
    assert res.returncode == 0, res.stdout + res.stderr
    return store


@pytest.fixture(scope="module")
def prefect_server_env(prefect_harness):
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": PREFECT_API_URL.value()}


@pytest.mark.slow  # about 90 s on 2 cores (the one-process reference run: 60 s more)
def test_a_worker_killed_mid_run_is_rescheduled_to_the_same_store(cluster, one_process, prefect_server_env,
                                                                   tmp_path):
    cluster.wait_for_workers(2)
    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "lyra_pipeline.cli", "run", "--preset", "smoke", "--num-scenes",
                             str(SCENES), "--store", str(store), "--dask-address", cluster.address],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env(), **prefect_server_env}, start_new_session=True)
    try:
        # kill the gpu-node worker machine while it holds a scene lease (mid-scene)
        victim = cluster.workers_pids()["gpu-node"]
        killed_holding = None
        deadline = time.time() + 300
        while killed_holding is None and time.time() < deadline and proc.poll() is None:
            for lease in (store / "leases").glob("*.json") if (store / "leases").exists() else []:
                try:
                    doc = json.loads(lease.read_text())
                except (OSError, ValueError):
                    continue
                if doc.get("pid") in victim:
                    cluster.kill("gpu-node")
                    killed_holding = lease.stem
                    break
            time.sleep(0.05)
        assert killed_holding is not None, "the gpu-node worker never held a scene"
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    # the rescheduled scene finished on the other worker: the same array and table bytes as one process
    ref, got = store_bytes(one_process), store_bytes(store)
    assert ref.keys() == got.keys()
    assert [k for k in ref if ref[k] != got[k]] == []
    assert units(store) == units(one_process) and {u[3] for u in units(store)} == {"done"}
    status = lyra("status", "--store", str(store))
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"{SCENES} scenes" in status.stdout
    table = status_rows(status.stdout)
    assert list(table) == ["input", "depth", "cameras", "warp", "refine", "generate", "latents", "video_depth"]
    for stage, (done, running, failed, total) in table.items():
        assert (done, running, failed, total) == (total, 0, 0, SCENES * (1 if stage in ("input", "depth") else 6))
    assert cluster.close() == []  # no orphan worker processes
