import numpy as np
import pytest

from lyra_ops.errors import LyraInputError, LyraStorageError
from lyra_pipeline.storage import ManifestRow, RunStore, content_key, validate_scene_id


@pytest.mark.parametrize("bad", ["../etc", "a/b", "a..b", "", ".hidden", "x" * 200, "a b", "é"])
def test_scene_id_rejects_paths_and_odd_names(bad):
    with pytest.raises(LyraInputError, match="invalid scene id"):
        validate_scene_id(bad, source="bank.parquet")


def test_scene_id_accepts_plain_names():
    for ok in ["proc-000001", "00", "my_scene.v2"]:
        assert validate_scene_id(ok) == ok


def test_content_key_depends_on_everything():
    base = content_key("warp", 1, {"a": 1}, {"depth": "k"})
    assert base == content_key("warp", 1, {"a": 1}, {"depth": "k"})
    assert base != content_key("warp", 2, {"a": 1}, {"depth": "k"})
    assert base != content_key("warp", 1, {"a": 2}, {"depth": "k"})
    assert base != content_key("warp", 1, {"a": 1}, {"depth": "k2"})
    assert base != content_key("refine", 1, {"a": 1}, {"depth": "k"})


@pytest.mark.parametrize("url_kind", ["local", "memory"])
def test_manifest_and_arrays_round_trip(tmp_path, url_kind):
    url = str(tmp_path / "store") if url_kind == "local" else f"memory://lyra-test-{tmp_path.name}"
    store = RunStore(url)
    store.record([ManifestRow("s1", "", "input", "running", "k1")])
    store.record([ManifestRow("s1", "", "input", "done", "k1", 0.5)])
    store.record([ManifestRow("s1", "left", "warp", "failed", "k2", 0.1, "LyraInputError: bad")])
    fresh = RunStore(url)  # no cache: reads files
    assert fresh.is_done("s1", "", "input", "k1")
    assert not fresh.is_done("s1", "", "input", "other-key")
    assert not fresh.is_done("s1", "left", "warp", "k2")
    table = fresh.read_manifest().to_pylist()
    assert {(r["stage"], r["status"]) for r in table} == {("input", "done"), ("warp", "failed")}
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    fresh.write_array("s1", "trajectories/left/warp/depth", data, chunks=(1, 3, 4), attrs={"x": 1})
    assert np.array_equal(RunStore(url).read_array("s1", "trajectories/left/warp/depth"), data)
    assert "trajectories/left/warp/depth" in fresh.list_arrays("s1")
    assert fresh.scene_ids() == ["s1"]
    with pytest.raises(LyraStorageError, match="has no array 'nope'"):
        fresh.read_array("s1", "nope")


def test_prompts_not_rewritten_when_unchanged(tmp_path):
    store = RunStore(tmp_path / "s")
    rows = [{"scene_id": "a", "text": "t", "image_path": None, "content_sha": "x", "seed": 1, "source": "procedural"}]
    assert store.write_prompts(rows) is True
    mtime = (tmp_path / "s" / "prompts.parquet").stat().st_mtime_ns
    assert store.write_prompts(rows) is False
    assert (tmp_path / "s" / "prompts.parquet").stat().st_mtime_ns == mtime
    assert store.read_prompts() == rows


def test_store_errors(tmp_path):
    with pytest.raises(LyraStorageError, match="not a lyra store"):
        RunStore(tmp_path / "nothing", create=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "store.json").write_text('{"format": "something-else"}')
    with pytest.raises(LyraStorageError, match="does not describe a lyra-store"):
        RunStore(tmp_path / "other")
    with pytest.raises(LyraStorageError, match="cannot open"):
        RunStore("nosuchprotocol://bucket/x")


def test_clean_partial_files(tmp_path):
    store = RunStore(tmp_path / "s")
    store.write_array("a", "input/K", np.eye(3, dtype=np.float32))
    junk = tmp_path / "s" / "scenes.zarr" / "a" / "input" / "K" / "c" / "0.partial"
    junk.parent.mkdir(parents=True, exist_ok=True)
    junk.write_bytes(b"x")
    (tmp_path / "s" / "manifest").mkdir(exist_ok=True)
    (tmp_path / "s" / "manifest" / "a.parquet.123.tmp").write_bytes(b"x")
    assert store.clean_partial_files() == 1  # store level: the manifest temp file, no walk through chunks
    assert junk.exists()
    assert store.clean_partial_files("a") == 1  # the scene's own chunks, when its lease is taken
    assert not junk.exists()


def test_manifest_index_plus_changed_files_equals_full_read(tmp_path):
    import os
    import time

    from lyra_pipeline.storage import MANIFEST_INDEX, ManifestRow, RunStore

    store = RunStore(tmp_path / "s")

    def rows(sid: str, status: str) -> list[ManifestRow]:
        return [ManifestRow(sid, "", "input", status, "k"), ManifestRow(sid, "left", "warp", status, "k")]

    for i in range(5):
        store.record(rows(f"s{i}", "done"))
    full = store._read_parquet_dir("manifest").sort_by("scene_id")
    assert store.read_manifest().equals(full)
    assert store.compact_manifest() == 10 and (tmp_path / "s" / MANIFEST_INDEX).exists()
    mtime = os.stat(tmp_path / "s" / MANIFEST_INDEX).st_mtime_ns
    store.compact_manifest()
    assert os.stat(tmp_path / "s" / MANIFEST_INDEX).st_mtime_ns == mtime  # unchanged: not rewritten
    # after the index: one scene changes, one is added, one manifest file disappears
    fresh = RunStore(tmp_path / "s")
    fresh.record(rows("s1", "failed"))
    fresh.record(rows("s9", "running"))
    (tmp_path / "s" / "manifest" / "s3.parquet").unlink()
    got = RunStore(tmp_path / "s").read_manifest()
    want = RunStore(tmp_path / "s")._read_parquet_dir("manifest").sort_by("scene_id")
    assert sorted(got.to_pylist(), key=str) == sorted(want.to_pylist(), key=str)
    assert {r["status"] for r in got.to_pylist() if r["scene_id"] == "s1"} == {"failed"}
    # the newest scene file is not the last by name: the index is written once, not again by the next compaction
    time.sleep(0.05)
    fresh.record(rows("s1", "done"))
    RunStore(tmp_path / "s").compact_manifest()
    mtime = os.stat(tmp_path / "s" / MANIFEST_INDEX).st_mtime_ns
    RunStore(tmp_path / "s").compact_manifest()
    assert os.stat(tmp_path / "s" / MANIFEST_INDEX).st_mtime_ns == mtime


def test_scene_lease_mutual_exclusion_and_stale_takeover(tmp_path):
    import threading
    import time

    from lyra_pipeline.stages import SceneLease
    from lyra_pipeline.storage import RunStore

    store = RunStore(tmp_path / "s")
    inside, overlaps, order = [0], [0], []

    def worker(name: str) -> None:
        lease = SceneLease(RunStore(tmp_path / "s"), "scene-a", name)
        lease.acquire(timeout_s=30)
        inside[0] += 1
        overlaps[0] = max(overlaps[0], inside[0])
        order.append(name)
        time.sleep(0.1)
        inside[0] -= 1
        lease.release()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps[0] == 1 and sorted(order) == ["w0", "w1", "w2", "w3"]
    assert store.read_lease("scene-a") is None  # released
    # an expired lease is taken over; so is one held by a process of this host that is gone
    store.write_lease("scene-b", "dead-run", ttl_s=-1)
    SceneLease(store, "scene-b", "me").acquire(timeout_s=5)
    assert store.read_lease("scene-b")["owner"] == "me"
    import json
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    doc = {"owner": "killed", "expires_at": time.time() + 600, "host": __import__("os").uname().nodename,
           "pid": int(gone.stdout)}
    (tmp_path / "s" / "leases" / "scene-c.json").write_text(json.dumps(doc))
    SceneLease(store, "scene-c", "me").acquire(timeout_s=5)
    assert store.read_lease("scene-c")["owner"] == "me"
    # a live foreign lease is not taken: acquire times out naming the holder
    store.write_lease("scene-d", "other-live-run", ttl_s=600)
    with pytest.raises(Exception, match="leased by"):
        SceneLease(store, "scene-d", "me").acquire(timeout_s=0.3)
