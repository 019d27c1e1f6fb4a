"""`lyra status` and `lyra run`'s "nothing to do" at 1M scenes (issue 29 item 5): the manifest index carries its
own counts, the manifest folder's mtime (so an unchanged store is not listed) and, after a run that finished every
scene, a completion stamp under the run's plan fingerprint. Each answer must equal what a full read gives."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from lyra_pipeline.storage import MANIFEST_INDEX, ManifestRow, RunStore
from lyra_pipeline.store import runstore


@pytest.fixture
def quiet_index(monkeypatch):
    """Index small stores the way big ones are (folder mtime recorded after a short quiet period)."""
    monkeypatch.setattr(runstore, "INDEX_QUIET_MIN_SCENES", 0)
    monkeypatch.setattr(runstore, "INDEX_QUIET_S", 0.05)


def full_counts(store: RunStore) -> Counter:
    """Units per (trajectory, stage, status) from every per-scene manifest file (no index)."""
    rows = store._read_parquet_dir("manifest").to_pylist()
    return Counter((r["trajectory"], r["stage"], r["status"]) for r in rows)


def rows(sid: str, status: str, trajectories=("left", "right")) -> list[ManifestRow]:
    return [ManifestRow(sid, "", "input", status, "k")] + [ManifestRow(sid, t, "warp", status, "k")
                                                           for t in trajectories]


def test_summary_from_the_index_equals_a_full_read(tmp_path, quiet_index, monkeypatch):
    store = RunStore(tmp_path / "s")
    store.write_prompts([{"scene_id": f"s{i}", "text": "", "image_path": None, "content_sha": "0", "seed": i,
                          "source": "procedural"} for i in range(6)])
    for i in range(6):
        store.record(rows(f"s{i}", "done"))
    store.compact_manifest()
    meta = pq.ParquetFile(tmp_path / "s" / MANIFEST_INDEX).metadata.metadata
    assert b"listing_mtime_ns" in meta and json.loads(meta[b"counts"])
    assert b"complete" not in meta  # nobody claimed the plan complete
    fresh = RunStore(tmp_path / "s")

    def no_listing(*_):
        raise AssertionError("an unchanged store must not be listed")

    monkeypatch.setattr(RunStore, "_listing_mtimes", no_listing)
    assert fresh.manifest_summary() == full_counts(fresh) == Counter({("", "input", "done"): 6,
                                                                      ("left", "warp", "done"): 6,
                                                                      ("right", "warp", "done"): 6})
    assert fresh.read_manifest().num_rows == 18
    monkeypatch.undo()
    monkeypatch.setattr(runstore, "INDEX_QUIET_MIN_SCENES", 0)
    # after the index: a scene changes status and loses a trajectory, one is added, one file disappears
    fresh.record(rows("s1", "failed", ("left",)), force=True)
    fresh.record(rows("s9", "running"))
    (tmp_path / "s" / "manifest" / "s3.parquet").unlink()
    again = RunStore(tmp_path / "s")
    assert again.manifest_summary() == full_counts(again)
    assert again.manifest_counts()[("warp", "failed")] == 1
    failed = again.read_manifest(columns=["scene_id", "trajectory", "stage", "status"], status="failed").to_pylist()
    assert sorted((r["scene_id"], r["trajectory"]) for r in failed) == [("s1", ""), ("s1", "left")]
    assert again.index_completion() is None


def test_a_finished_run_answers_nothing_to_do_from_the_index(tmp_path, quiet_index, monkeypatch, prefect_harness):
    """A smoke run of 1 scene stamps its index complete; the next `lyra run` answers from the footer (the scene
    list is not planned: ``_bind`` never runs) and `lyra status` does not list the manifest folder. A config that
    changes a key, a changed scene list or a manifest written since all take the planned way."""
    from typer.testing import CliRunner

    from lyra_pipeline import cli

    store = tmp_path / "store"
    args = ["run", "--preset", "smoke", "--num-scenes", "1", "--store", str(store), "--workers", "1"]
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    st = RunStore(store, create=False)
    stamp = st.index_completion()
    assert stamp is not None and stamp["scenes"] == 1

    def planned(*_, **__):
        raise AssertionError("planned the scenes")

    with monkeypatch.context() as m:
        m.setattr(cli, "_bind", planned)
        m.setattr(RunStore, "_listing_mtimes", planned)
        for again in (args, ["run", "--store", str(store)]):
            res = CliRunner().invoke(cli.app, again)
            assert res.exit_code == 0 and "nothing to do: all 1 scenes" in res.output, res.output
        res = CliRunner().invoke(cli.app, ["status", "--store", str(store)])
        assert res.exit_code == 0 and "1 scenes" in res.output, res.output
    by_stage = Counter()
    for (_, stage, status), n in full_counts(st).items():
        by_stage[(stage, status)] += n
    assert st.manifest_counts() == dict(by_stage) and by_stage[("generate", "done")] == 6

    def fast(*options) -> bool:
        return cli._finished_from_index(str(store), *options)

    none = (None,) * 8
    assert fast(*none)
    mask = tmp_path / "mask.yaml"
    mask.write_text("mask: {threshold: 0.03}\n")
    assert not fast(None, mask, *(None,) * 6)  # another mask threshold: other refine keys
    assert not fast(None, None, 2, *(None,) * 5)  # --num-scenes 2: another scene list
    assert not fast("default", *(None,) * 7)  # another preset: another video size
    # a manifest written after the index (a damaged unit marked for recompute): the stamp no longer holds
    sid = st.scene_ids()[0]
    row = st.scene_manifest(sid)[("left", "generate")]
    st.record([ManifestRow(sid, "left", "generate", "damaged", row.key)], force=True)
    assert RunStore(store, create=False).index_completion() is None and not fast(*none)
    assert RunStore(store, create=False).manifest_counts()[("generate", "damaged")] == 1


def test_the_plan_fingerprint_follows_every_key_input_and_nothing_else():
    """Two configs with one fingerprint give every scene the same keys (the completion stamp's premise): a change
    of any section a key reads changes it (and the keys of a sample of scenes); how the run computes does not."""
    from lyra_ops.prompts import SceneRecord
    from lyra_pipeline.config import build_config
    from lyra_pipeline.stages import plan_fingerprint, plan_keys

    base = build_config("smoke", {})
    scenes = [SceneRecord(f"s{i}", "", None, f"{i:064x}", i, "procedural") for i in range(3)]

    def keys(cfg):
        return [plan_keys(cfg, s) for s in scenes]

    for over in ({"video": {"num_frames": 17}}, {"trajectories": {"names": ["left", "up"]}},
                 {"trajectories": {"distance_factor": 1.5}}, {"depth": {"max_depth": 50.0}},
                 {"warp": {"depth_weight_scale": 20.0}}, {"mask": {"threshold": 0.03}}, {"mask": {"refine": False}},
                 {"generator": {"steps": 10}}, {"latents": {"dtype": "float32"}}):
        other = build_config("smoke", over)
        assert plan_fingerprint(other) != plan_fingerprint(base), over
        assert keys(other) != keys(base), over
    same = build_config("smoke", {"compute": {"torch_threads": 2}})
    assert plan_fingerprint(same) == plan_fingerprint(base) and keys(same) == keys(base)
