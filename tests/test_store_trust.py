"""A store nothing can damage silently (issue 26): commands bound to the store's dataset, failing commands that
leave the store byte-identical, checksummed chunks, `lyra verify [--repair]`, clean interrupts."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from lyra_pipeline.cli import app
from lyra_pipeline.storage import ManifestRow, RunStore
from tests.conftest import SMALL

runner = CliRunner()
TEACHER = "trajectories/left/teacher/rgb"


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file of a store (leases included: a failing command must not leave one)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def arrays(root: Path) -> dict[str, str]:
    """sha256 of every file under scenes.zarr (chunks and metadata: bit-identical stores have equal maps)."""
    return {k: v for k, v in snapshot(root).items() if k.startswith("scenes.zarr")}


def invoke(*args: str):
    res = runner.invoke(app, list(args))
    assert "Traceback" not in res.output, res.output
    return res


def one_line(res) -> str:
    return " ".join(res.output.split())


def lyra_run(*args: str) -> subprocess.CompletedProcess:
    """`lyra run ARGS` as a user runs it, in a new process (on the session's Prefect test server)."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.run([sys.executable, "-m", "lyra_pipeline.cli", "run", *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def flow_store(finished_store) -> Path:
    """The session's finished SMALL store (made by the generate-dataset flow, which records its dataset)."""
    return finished_store


@pytest.fixture
def store(flow_store, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(flow_store, tmp_path / "store"))


# --- commands bound to the store's dataset ----------------------------------------------------------------------


def test_store_records_its_dataset(flow_store):
    from lyra_pipeline.store.dataset import read_dataset

    ds = read_dataset(RunStore(flow_store, create=False))
    assert ds.preset == "smoke" and ds.overrides["video"] == SMALL["video"] and ds.scenes == 2


def test_stage_without_preset_uses_the_stores_config_and_changes_nothing(store):
    """Before: `lyra stage warp --scene proc-000000` without --preset used the default preset: "stage 'depth' ...
    is not done", prompts rewritten to 6 scenes, six done warp units turned into 5 running + 1 failed."""
    before = snapshot(store)
    res = invoke("stage", "warp", "--scene", "proc-000000", "--store", str(store))
    assert res.exit_code == 0, res.output
    assert "computed 0, reused 3" in one_line(res)
    assert snapshot(store) == before


FAILING = [  # (arguments after the command name, what the one line says); {store} is the store under test
    (["stage", "warp", "--preset", "default"], "holds preset smoke: 2 procedural scenes"),
    (["run", "--preset", "default"], "this run gives preset default: 6 procedural scenes"),
    (["run", "--seed", "7"], "a command cannot change a store's scene list"),
    (["evaluate", "--preset", "default"], "a command cannot change a store's scene list"),
    (["stage", "depth", "--num-scenes", "1"], "1 scenes instead of 2"),
    (["run", "--scene", "proc-999999"], "--scene: unknown scene id(s) ['proc-999999']"),
    (["run", "--dask-address", "tcp://127.0.0.1:1"], "no Dask scheduler answers there"),
    (["run", "--num-scenes", "1000000000"], "more than 1000000 scenes per store"),
    (["verify", "--scene", "nosuch"], "has no scene(s) ['nosuch']"),
    (["export-ply", "nosuch"], "nosuch"),
    (["refine", "nosuch"], "nosuch"),
    (["inspect", "nosuch"], "no scene 'nosuch'"),
    (["train", "--preset", "bogus"], "bogus"),
]


def test_failing_commands_leave_the_store_byte_identical(store):
    before = snapshot(store)
    for args, says in FAILING:
        res = invoke(*args, "--store", str(store))
        assert res.exit_code == 2, (args, res.output)
        assert says in one_line(res), (args, res.output)
        assert snapshot(store) == before, f"{args} changed the store"


def test_commands_that_create_nothing(tmp_path):
    """Before: `stage warp --store NEW` created the store, a manifest and a failed unit; `run --store ""` wrote a
    store into the current folder; `run --scene proc-999999` exited 0 after writing a store."""
    new = tmp_path / "new"
    res = invoke("stage", "warp", "--scene", "proc-000000", "--store", str(new), "--preset", "smoke")
    assert res.exit_code == 2 and "stage 'depth' of proc-000000 is not done" in one_line(res)
    res = invoke("run", "--preset", "smoke", "--scene", "proc-999999", "--store", str(new))
    assert res.exit_code == 2 and "unknown scene id(s) ['proc-999999']" in one_line(res)
    res = invoke("run", "--preset", "smoke", "--dask-address", "tcp://127.0.0.1:1", "--store", str(new))
    assert res.exit_code == 2 and "no Dask scheduler answers" in one_line(res)
    assert not new.exists()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        res = invoke("run", "--preset", "smoke", "--store", "")
    finally:
        os.chdir(cwd)
    assert res.exit_code == 2 and "--store: empty store URL" in one_line(res)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_run_grows_only_when_asked(flow_store):
    from lyra_ops.errors import LyraConfigError
    from lyra_pipeline.store.dataset import bind

    st = RunStore(flow_store, create=False)
    grown = bind(st, None, {"scenes": {"num_scenes": 3}}, command="run")
    assert grown.grows and [r.scene_id for r in grown.records][:2] == ["proc-000000", "proc-000001"]
    with pytest.raises(LyraConfigError, match="cannot change a store's scene list"):
        bind(st, None, {"scenes": {"num_scenes": 3}}, command="evaluate")
    same = bind(st, None, {"mask": {"threshold": 0.05}}, command="stage")  # a section: recomputed, not refused
    assert not same.grows and same.config.mask.threshold == 0.05 and same.config.video.height == 48


# --- integrity: checksums, missing chunks, damaged tables ----------------------------------------------------


def chunk_file(root: Path, scene: str, array: str, frame: int) -> Path:
    return root / "scenes.zarr" / scene / array / "c" / str(frame) / "0" / "0" / "0"


def test_arrays_are_checksummed_and_empty_chunks_written(flow_store):
    st = RunStore(flow_store, create=False)
    from lyra_pipeline.store.runstore import is_checksummed

    for sid in st.scene_ids():
        for name, arr in st.list_arrays(sid).items():
            assert is_checksummed(arr), name
            assert not st.missing_chunks(sid, name, arr), name


def test_corrupted_chunk_is_named_verified_and_repaired(store, flow_store, prefect_harness):
    """Before: a chunk of teacher/rgb overwritten with random bytes: status all done, run "nothing to do", inspect
    "Zstd decompression error" (no array or chunk named), export-ply a RuntimeError traceback."""
    f = chunk_file(store, "proc-000000", TEACHER, 3)
    data = bytearray(f.read_bytes())
    data[8:40] = np.random.default_rng(0).integers(0, 256, 32, dtype=np.uint8).tobytes()
    f.write_bytes(bytes(data))
    where = f"proc-000000/{TEACHER}, chunk c/3/0/0/0"
    for args in (["inspect", "proc-000000", "--array", TEACHER], ["export-ply", "proc-000000", "--out",
                                                                  str(store.parent / "x.ply")]):
        res = invoke(*args, "--store", str(store))
        assert res.exit_code == 2 and where in one_line(res) and "lyra verify" in one_line(res), res.output
    res = invoke("verify", "--store", str(store))
    assert res.exit_code == 1, res.output
    assert f"scenes.zarr/{where}: expected crc32c" in one_line(res)
    assert "[unit proc-000000 left generate]" in one_line(res)
    res = invoke("verify", "--store", str(store), "--repair")
    assert res.exit_code == 0 and "marked proc-000000 left generate for recompute" in one_line(res), res.output
    res = invoke("status", "--store", str(store))
    assert "damaged" in res.output
    assert not (store / "scenes.zarr" / "proc-000000" / "trajectories" / "left" / "teacher").exists()  # starts clean
    proc = lyra_run("--store", str(store))
    assert proc.returncode == 0 and "computed 1 stage units" in proc.stderr, proc.stderr[-3000:]
    assert arrays(store) == arrays(flow_store)
    assert invoke("verify", "--store", str(store)).exit_code == 0


def test_deleted_chunk_is_an_error_never_zeros(store, flow_store, prefect_harness):
    """Before: a deleted chunk read as a black frame, `lyra run` said "nothing to do", no error anywhere."""
    chunk_file(store, "proc-000001", "trajectories/zoom_in/warp/mask", 2).unlink()
    st = RunStore(store, create=False)
    from lyra_ops.errors import LyraStorageError

    with pytest.raises(LyraStorageError, match=r"warp/mask, chunk c/2/0/0/0: chunk file missing"):
        st.read_array("proc-000001", "trajectories/zoom_in/warp/mask")
    res = invoke("verify", "--store", str(store), "--repair")
    assert "expected the chunk file, found nothing" in one_line(res) and res.exit_code == 0, res.output
    assert lyra_run("--store", str(store)).returncode == 0
    assert arrays(store) == arrays(flow_store)


def test_damaged_manifest_is_one_line_then_repaired(store, flow_store, prefect_harness):
    """Before: a manifest file overwritten with garbage: `lyra status` / `lyra run` ended in a pyarrow
    ArrowInvalid traceback that did not name the file."""
    (store / "manifest" / "proc-000001.parquet").write_bytes(b"garbage" * 50)
    for args in (["status"], ["run"]):
        res = invoke(*args, "--store", str(store))
        assert res.exit_code == 2, res.output
        assert "manifest/proc-000001.parquet: not a readable Parquet file" in one_line(res), res.output
    res = invoke("verify", "--store", str(store), "--repair")
    assert res.exit_code == 0 and "proc-000001 is recomputed whole" in one_line(res), res.output
    proc = lyra_run("--store", str(store))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert arrays(store) == arrays(flow_store)
    keep = ["scene_id", "trajectory", "stage", "status", "key"]

    def units(root: Path) -> list[dict]:  # the manifest less run ids, timings and evaluate rows
        return sorted((r for r in RunStore(root, create=False).read_manifest(columns=keep).to_pylist()
                       if r["stage"] != "evaluate"), key=lambda r: tuple(r.values()))

    assert units(store) == units(flow_store)


def test_damaged_scene_list_is_rebuilt_from_the_dataset(store):
    before = (store / "prompts.parquet").read_bytes()
    (store / "prompts.parquet").write_bytes(b"\x00" * 300)
    assert invoke("status", "--store", str(store)).exit_code == 2
    res = invoke("verify", "--store", str(store), "--repair")
    assert "rebuilt prompts.parquet from dataset.json" in one_line(res), res.output
    assert (store / "prompts.parquet").read_bytes() == before


def test_clean_store_verifies(flow_store):
    before = snapshot(flow_store)
    res = invoke("verify", "--store", str(flow_store))
    assert res.exit_code == 0 and "no damage" in res.output and " 0 damaged" not in res.output
    done = sum(r["status"] == "done" for r in RunStore(flow_store, create=False).read_manifest().to_pylist())
    assert done >= 40 and f"{done} finished units" in one_line(res)  # 40 SDG units (+ evaluate's, if it ran)
    assert snapshot(flow_store) == before


# --- interrupts ---------------------------------------------------------------------------------------------


def test_interrupted_unit_is_recorded_pending_not_failed(tmp_path):
    from lyra_pipeline.stages import StageReport, StageRun
    from lyra_pipeline.store import interrupt

    st = RunStore(tmp_path / "s")
    with pytest.raises(interrupt.Interrupted):
        with StageRun(st, "s1", "", "input", "k", "r", StageReport("s1", "input")):
            raise interrupt.Interrupted("stop")
    row = RunStore(tmp_path / "s", create=False).scene_manifest("s1")[("", "input")]
    assert row.status == "interrupted" and not st.is_done("s1", "", "input", "k")


def test_a_retried_task_counts_the_units_its_failed_attempt_computed(tmp_path, prefect_harness):
    """A stage task retried after a transient error finds the units its first attempt finished done: they were
    computed by this task run, so the retry's report counts them as computed (before: as found done, so no run
    summary counted them). Outside that task run (another task run, or a later command) they are found done."""
    from prefect import flow, task

    from lyra_pipeline.stages import StageReport, StageRun

    st = RunStore(tmp_path / "s")
    attempts = []

    def units(run_id: str, fail: bool) -> StageReport:
        report = StageReport("s1", "warp")
        for name in ("a", "b"):
            with StageRun(st, "s1", name, "warp", "k", run_id, report) as run:
                if not run.skip and fail and name == "b":
                    raise OSError("transient")
        return report

    @task(retries=1, retry_delay_seconds=0)
    def stage_task(run_id: str) -> StageReport:
        attempts.append(run_id)
        return units(run_id, fail=len(attempts) == 1)

    @flow
    def one_run(run_id: str) -> StageReport:
        return stage_task(run_id)

    retried = one_run("r1")
    assert len(attempts) == 2 and (retried.computed, retried.skipped) == (2, 0)
    again = one_run("r1")  # another task run (e.g. the same command run again): nothing computed
    assert (again.computed, again.skipped) == (0, 2)
    assert (units("r1", fail=False).computed, units("r1", fail=False).skipped) == (0, 2)


def test_sigint_stops_cleanly_and_resumes_identically(flow_store, tmp_path, prefect_harness):
    """Before: Ctrl-C 20 s into a run printed 355 lines with 6 tracebacks and left the interrupted units failed."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONUNBUFFERED": "1"}
    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump({"preset": "smoke", **SMALL}))
    url = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "lyra_pipeline.cli", "run", "--config", str(cfg), "--store",
                             str(url), "--workers", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            done = sum(r["status"] == "done" for r in RunStore(url, create=False).read_manifest().to_pylist())
        except Exception:  # noqa: BLE001 - not there yet, or a file being replaced
            done = 0
        if done >= 6:
            break
        time.sleep(0.05)
    sent = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert time.time() - sent < 10
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err + out and "Logging error" not in err + out, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and "will resume on the next run" in lines[0], err[-3000:]
    rows = RunStore(url, create=False).read_manifest().to_pylist()
    assert not [r for r in rows if r["status"] in ("failed", "running")], rows
    assert not list((url / "leases").glob("*.json"))
    proc = lyra_run("--config", str(cfg), "--store", str(url))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert arrays(url) == arrays(flow_store)


def test_done_units_never_become_failed_when_upstream_is_missing(store):
    """A stage whose upstream is not done fails before writing any row (before: running + failed over done)."""
    st = RunStore(store, create=False)
    rows = st.scene_manifest("proc-000000")
    st.record([ManifestRow("proc-000000", t, stage, "damaged", rows[(t, stage)].key, run_id="t")
               for t, stage in (("", "depth"), ("left", "warp"))])
    before = snapshot(store)
    res = invoke("stage", "warp", "--store", str(store), "--scene", "proc-000000")
    assert res.exit_code == 2 and "stage 'depth' of proc-000000 is not done" in one_line(res)
    assert snapshot(store) == before


def test_verify_flow_publishes_and_fails_on_damage(store, prefect_harness):
    """The scheduled scrub (deployment verify-store): a clean store passes, damage fails the flow run."""
    from flows.verify_store import StoreDamaged, verify_store

    assert verify_store(store=str(store))["damage"] == []
    (store / "scenes.zarr" / "proc-000000" / "depth" / "depth" / "c" / "0" / "0").unlink()
    with pytest.raises(StoreDamaged, match="1 damaged"):
        verify_store(store=str(store))
    report = verify_store(store=str(store), repair=True)
    assert report["repaired"] == ["marked proc-000000 - depth for recompute"]


def test_evaluate_without_preset_keeps_the_scene_list(store, prefect_harness):
    """Before: `lyra evaluate --store S` without --preset rewrote prompts.parquet to the default preset's 6 scenes
    and wrote manifests for scenes that do not exist."""
    from flows.evaluate_dataset import evaluate_dataset

    prompts, manifests = (store / "prompts.parquet").read_bytes(), sorted((store / "manifest").iterdir())
    evaluate_dataset(store=str(store))  # preset None: the store's own (smoke, SMALL)
    assert (store / "prompts.parquet").read_bytes() == prompts
    assert sorted((store / "manifest").iterdir()) == manifests
    assert sorted(p.stem for p in (store / "eval" / "frames").iterdir()) == ["proc-000000", "proc-000001"]


def test_evaluate_with_no_finished_scene_is_one_line(store):
    """Before: `lyra evaluate` on a store whose only scene failed: `max() arg is an empty sequence` traceback,
    prompts rewritten, evaluate units left running."""
    st = RunStore(store, create=False)
    for sid in ("proc-000000", "proc-000001"):
        rows = st.scene_manifest(sid)
        st.record([ManifestRow(sid, t, "generate", "failed", rows[(t, "generate")].key, error="boom")
                   for t in ("left", "zoom_in", "clockwise")])
    before = snapshot(store)
    res = invoke("evaluate", "--store", str(store))
    assert res.exit_code == 2 and "no scene has finished teacher frames" in one_line(res), res.output
    assert snapshot(store) == before


def test_a_deleted_scene_group_and_scene_list_are_damage_not_created(store, flow_store, prefect_harness):
    """verify opens, never creates: a scene whose Zarr group is gone is damage (every finished unit of it), a
    missing scene list too; --repair + run rebuild both."""
    import shutil

    shutil.rmtree(store / "scenes.zarr" / "proc-000001")
    (store / "prompts.parquet").unlink()
    before = snapshot(store)
    res = invoke("verify", "--store", str(store))
    assert res.exit_code == 1 and snapshot(store) == before, res.output
    assert "scenes.zarr/proc-000001: expected the scene's Zarr group, found nothing" in one_line(res)
    assert "prompts.parquet: expected the file, found nothing" in one_line(res)
    res = invoke("verify", "--store", str(store), "--repair")
    assert res.exit_code == 0, res.output
    assert lyra_run("--store", str(store)).returncode == 0
    assert arrays(store) == arrays(flow_store)
    assert (store / "prompts.parquet").read_bytes() == (flow_store / "prompts.parquet").read_bytes()
