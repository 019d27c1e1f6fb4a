"""Integration: a Prefect server on PostgreSQL (subprocess, 127.0.0.1), `prefect deploy --all` from prefect.yaml,
a process worker, and `prefect deployment run` of generate-dataset to completion; the store is checked."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lyra_pipeline.storage import RunStore

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_server():
    from lyra_pipeline.server import drop_database, start_server

    try:
        import asyncpg  # noqa: F401
    except ImportError:
        pytest.skip("asyncpg not installed")
    db = f"postgresql+asyncpg://postgres@127.0.0.1:5432/lyra_test_{os.getpid()}"
    port = free_port()
    try:
        proc = start_server(db, port=port, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env_overrides={"PREFECT_UI_ENABLED": "false"})
    except Exception as exc:  # noqa: BLE001 - no PostgreSQL on this machine
        pytest.skip(f"no PostgreSQL-backed Prefect server: {exc}")
    yield f"http://127.0.0.1:{port}/api"
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
    drop_database(db)


def prefect(args: list[str], env: dict, timeout: float = 300, cwd: Path = REPO) -> str:
    proc = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_generate_dataset_deployment_on_postgres_server(postgres_server, tmp_path):
    env = {**os.environ, "PREFECT_API_URL": postgres_server, "PREFECT_LOGGING_LEVEL": "WARNING",
           "PYTHONPATH": str(REPO)}
    prefect(["work-pool", "create", "lyra-process", "--type", "process"], env)
    out = prefect(["deploy", "--all"], env)
    for name in ("generate-dataset", "distill-decoder", "retrain-decoder"):
        assert name in out
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "lyra-process",
                               "--limit", "1"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        store = tmp_path / "store"
        params = {"store": str(store), "preset": "smoke",
                  "overrides": {"scenes": {"num_scenes": 1}, "trajectories": {"names": ["left"]}}}
        out = prefect(["deployment", "run", "generate-dataset/generate-dataset", "--params", json.dumps(params),
                       "--watch", "--watch-timeout", "400"], env, timeout=450)
        assert "Completed" in out, out[-2000:]
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:  # a busy machine: do not let a slow shutdown fail the test
            worker.kill()
            worker.wait(30)
    rows = RunStore(store, create=False).read_manifest().to_pylist()
    assert len(rows) == 2 + 6 and {r["status"] for r in rows} == {"done"}
    # the scheduled retraining deployment carries its cron schedule
    out = prefect(["deployment", "inspect", "retrain-decoder/retrain-decoder"], env)
    assert "0 3 * * *" in out
