"""Per-scene refinement (`lyra refine`, `lyra reconstruct --refine`): exact resume, idempotence, bad input.

Tiny step counts on the smoke store (96x160, 9-frame paths); torch single-threaded like the optimiser's tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lyra_ops.errors import LyraInputError
from lyra_pipeline.cli import app
from lyra_pipeline.reconstruct import load_decoder
from lyra_pipeline.refine import (
    RefineConfig,
    checkpoint_rel,
    checkpoint_steps,
    finish_refine,
    plan_refine,
    refine_rel,
    refine_scene_inprocess,
    refine_until,
)
from lyra_pipeline.storage import RunStore

SCENE = "proc-000000"
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


class Killed(BaseException):
    """Stands in for kill -9 at one moment (a BaseException: nothing catches it on the way out)."""


def test_refine_resumes_exactly_after_a_kill(smoke_store, tmp_path, monkeypatch):
    """A refinement killed inside a chunk (step 4's state written, its commit marker not) and re-run from the top
    ends with the same bytes as an uninterrupted one, computing only the steps after the last commit; the
    chunking changes neither the name nor the result."""
    other = Path(shutil.copytree(smoke_store, tmp_path / "other"))
    model, source = load_decoder(RunStore(smoke_store), None)
    whole_plan, whole = refine_scene_inprocess(RunStore(other), SCENE, RefineConfig(steps=6, checkpoint_every=6),
                                               model, source)
    config = RefineConfig(steps=6, checkpoint_every=2)
    st = RunStore(smoke_store)
    real_write = RunStore.write_file

    def write_then_die(self, rel, data):
        if rel.endswith("step-00000004.json"):
            raise Killed
        return real_write(self, rel, data)

    monkeypatch.setattr(RunStore, "write_file", write_then_die)
    with pytest.raises(Killed):
        refine_scene_inprocess(st, SCENE, config, model, source)
    monkeypatch.setattr(RunStore, "write_file", real_write)
    name = whole_plan.name
    assert checkpoint_steps(st, SCENE, name) == [2]
    assert st.read_file(checkpoint_rel(SCENE, name, 4, ".safetensors")) is not None  # the uncommitted state
    computed = [refine_until(st, SCENE, name, end)["computed"] for end in (2, 4, 6)]
    assert computed == [0, 2, 2]  # resumed from step 2
    resumed = finish_refine(st, SCENE, name)
    assert resumed["sha256"] == whole["sha256"]
    assert st.read_file(refine_rel(SCENE, name, "gaussians.safetensors")) == RunStore(other).read_file(
        refine_rel(SCENE, name, "gaussians.safetensors"))
    assert checkpoint_steps(st, SCENE, name) == [6]  # only the newest checkpoint is kept
    assert plan_refine(st, SCENE, config, model, source).name == name


@pytest.mark.slow
def test_refine_improves_unfitted_frames_from_both_inits(smoke_store):
    st = RunStore(smoke_store)
    model, source = load_decoder(st, None)
    for init in ("decoder", "rgbd"):
        _, result = refine_scene_inprocess(st, SCENE, RefineConfig(steps=30, init=init), model, source)
        assert result["init"].startswith(init)
        assert result["held_out_frames"] > 0 and result["fitted_frames"] > 0
        for bg in ("white", "grey", "input_mean"):
            assert result["psnr_after"][bg] > result["psnr_before"][bg], (init, bg, result)


def test_refine_flow_exports_and_a_finished_rerun_does_nothing(smoke_store, tmp_path, prefect_harness):
    from lyra_ops.gaussians import Gaussians

    out = tmp_path / "out" / "scene.ply"
    args = ["refine", SCENE, "--store", str(smoke_store), "--steps", "4", "--out", str(out)]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "4 steps computed now" in first.output
    assert Gaussians.from_ply(out).num > 1000 and out.with_suffix(".png").is_file()
    before = files(smoke_store)
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "up to date: " in again.output and "nothing written" in again.output  # the export is content-addressed
    assert files(smoke_store) == before  # nothing in the store was rewritten


@pytest.mark.parametrize("extra, message", [
    (["nosuchscene"], "scene 'nosuchscene'"),
    ([SCENE, "--steps", "0"], "expected an integer >= 1, got 0"),
    ([SCENE, "--steps", "-5"], "expected an integer >= 1, got -5"),
    ([SCENE, "--init", "mesh"], "--init: expected one of"),
    ([SCENE, "--checkpoint", "GARBAGE"], "not a readable safetensors"),
    ([SCENE, "--out", "x.obj"], "--out must be a .ply"),
])  # fmt: skip
def test_refine_bad_input_one_line_nothing_written(smoke_store, tmp_path, extra, message):
    if "GARBAGE" in extra:
        garbage = tmp_path / "garbage.safetensors"
        garbage.write_bytes(b"\x00not a checkpoint")
        extra = [str(garbage) if a == "GARBAGE" else a for a in extra]
    before = files(smoke_store)
    res = runner.invoke(app, ["refine", *extra, "--store", str(smoke_store)])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert any(message in line for line in lines), res.output
    assert "Traceback" not in res.output and lines[-1].startswith("error:")
    assert files(smoke_store) == before


def test_reconstruct_refine_zero_and_bad_image_write_nothing(tmp_path, examples_dir):
    image = sorted((examples_dir / "samples").glob("*.png"))[0]
    res = runner.invoke(app, ["reconstruct", "--image", str(image), "--refine", "0", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2, res.output
    assert "--refine: expected an integer >= 1 (optimiser steps), got 0" in res.output, res.output
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    res = runner.invoke(app, ["reconstruct", "--image", str(bad), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and f"{bad}: cannot decode image" in res.output, res.output
    assert not (tmp_path / "r").exists()


def test_refine_config_checks():
    with pytest.raises(LyraInputError, match="--background"):
        RefineConfig(background="grey")
    with pytest.raises(LyraInputError, match="min_init_opacity"):
        RefineConfig(min_init_opacity=1.0)


def test_storage_layout_documents_refine_files(smoke_store):
    """storage_layout.md's ``refine/<scene_id>/<name>/...`` rows match exactly the files a refinement writes."""
    import re

    st = RunStore(smoke_store)
    model, source = load_decoder(st, None)
    refine_scene_inprocess(st, SCENE, RefineConfig(steps=2), model, source)
    doc = (Path(__file__).resolve().parents[1] / "storage_layout.md").read_text()
    patterns = []
    for line in doc.splitlines():
        cell = line.strip().strip("|").split("|")[0].strip().strip("`")
        if line.startswith("|") and cell.startswith("refine/<scene_id>/<name>/"):
            regex = re.escape(cell).replace(re.escape("<scene_id>"), SCENE)
            regex = regex.replace(re.escape("<name>"), r"refine-[0-9a-f]{12}").replace(re.escape("<N>"), r"\d{8}")
            patterns.append(re.compile("^" + regex + "$"))
    written = [str(p.relative_to(smoke_store)) for p in (smoke_store / "refine").rglob("*") if p.is_file()]
    assert patterns and written
    for f in written:
        assert any(p.match(f) for p in patterns), f"{f} is written but not documented in storage_layout.md"
    for p in patterns:
        assert any(p.match(f) for f in written), f"{p.pattern} documented but not written"
    result = json.loads(st.read_file(refine_rel(SCENE, written[0].split("/")[2], "result.json")))
    assert result["steps"] == 2


def _targets(held: int):
    import torch

    from lyra_ops.cameras import Cameras
    from lyra_pipeline.refine import SceneTargets

    c2w = torch.eye(4).repeat(held, 1, 1)
    c2w[:, 0, 3] = torch.arange(held, dtype=torch.float32)  # frame i sits at x = i
    k = torch.tensor([[8.0, 0, 4], [0, 8.0, 3], [0, 0, 1]]).repeat(held, 1, 1)
    frames = torch.arange(held, dtype=torch.float32)[:, None, None, None].expand(held, 3, 6, 8)
    return SceneTargets(frames[:1], Cameras(c2w[:1], k[:1], 6, 8), torch.zeros(1, 1, 6, 8), frames,
                        Cameras(c2w, k, 6, 8), [("a", 0)], [("a", i + 1) for i in range(held)],
                        torch.zeros(3, 6, 8, dtype=torch.uint8))


def test_held_out_scoring_takes_evenly_spaced_frames():
    from lyra_pipeline.refine import HELD_OUT_SCORED, scored_held_out

    t = scored_held_out(_targets(72))
    assert HELD_OUT_SCORED == 24 and len(t.held) == 24
    picked = [float(x) for x in t.held_frames[:, 0, 0, 0]]
    assert picked == [float(i) for i in range(0, 72, 3)]  # frames, cameras and names stay together
    assert [float(x) for x in t.held_cameras.c2w[:, 0, 3]] == picked and t.held[1] == ("a", 4)
    assert len(scored_held_out(_targets(25)).held) == 13  # every 2nd
    small = _targets(9)
    assert scored_held_out(small) is small


def test_compute_threads_pins_torch_ops_to_one_thread_and_the_kernel_to_the_count(monkeypatch):
    import torch

    from lyra_ops import raster_kernel
    from lyra_pipeline.refine import _compute_threads

    if raster_kernel.kernel() is None:
        pytest.skip("no C compiler: the kernel cannot be built")
    seen, previous = [], torch.get_num_threads()
    try:
        with _compute_threads(3):
            seen.append((torch.get_num_threads(), raster_kernel.threads(),
                         torch.are_deterministic_algorithms_enabled()))
        assert seen == [(1, 3, True)] and torch.get_num_threads() == 3  # the refinement's count stays pinned
        monkeypatch.setenv("LYRA_RASTER_KERNEL", "torch")  # no kernel: everything at the count
        with _compute_threads(2):
            seen.append((torch.get_num_threads(), raster_kernel.threads()))
        assert seen[1] == (2, 2)
    finally:
        torch.set_num_threads(previous)
