"""CLI error handling found in testing (issue 15 section 4): validate first, write after; one line per failure."""

from __future__ import annotations

import logging
import shutil
import sys

import pytest
from typer.testing import CliRunner

from lyra_pipeline.cli import ConsoleFailureFilter, app

runner = CliRunner()


def test_stage_with_an_unknown_scene_creates_no_store(tmp_path):
    store = tmp_path / "new_store"
    res = runner.invoke(app, ["stage", "warp", "--preset", "smoke", "--scene", "../x", "--store", str(store)])
    assert res.exit_code == 2, res.output
    assert "--scene: unknown scene id(s) ['../x']" in res.output and "proc-000000" in res.output
    assert not store.exists()


def test_console_filter_keeps_one_line_per_failure():
    """Prefect's failed-flow record (with its traceback) is dropped from the console, a failed task run stays one
    line without its traceback; other records pass untouched."""
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    filt = ConsoleFailureFilter()
    flow = logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "Encountered exception", None, exc_info)
    task = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "Finished in state Failed", None,
                             exc_info)
    other = logging.LogRecord("lyra_pipeline.inputs", logging.WARNING, __file__, 1, "careful", None, exc_info)
    assert not filt.filter(flow)
    assert filt.filter(task) and task.exc_info is None
    assert filt.filter(other) and other.exc_info is not None
    handler = logging.StreamHandler()
    handler.addFilter(filt)
    assert "Traceback" not in handler.format(task)


@pytest.mark.slow
def test_run_with_a_failing_scene_prints_no_traceback(tmp_path, examples_dir):
    """A truncated image is refused before any work: one line naming it, no store, no Prefect (it used to fail its
    scene ~45 s into the run). A scene that fails mid-run (here its NAME.depth.npy, read by the depth stage, is
    not an array) shows one line for the failed unit and the error line, no Prefect traceback (before: ~15 lines
    of it)."""
    import subprocess

    import numpy as np

    images = tmp_path / "images"
    images.mkdir()
    good = sorted((examples_dir / "samples").glob("*.png"))[0]
    shutil.copy(good, images / "good.png")
    (images / "bad.png").write_bytes(good.read_bytes()[:20000])
    run = [sys.executable, "-m", "lyra_pipeline.cli", "run", "--preset", "smoke", "--images", str(images),
           "--num-scenes", "2"]
    proc = subprocess.run([*run, "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "Traceback" not in err, err[-3000:]
    assert err.count("bad.png: cannot decode image") == 1, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"error: {images / 'bad.png'}: cannot decode image"), err
    assert not (tmp_path / "store").exists()

    shutil.copy(good, images / "bad.png")  # both images decode now; bad's depth file fails its scene mid-run
    np.save(images / "good.depth.npy", np.full((90, 160), 2.0, dtype=np.float32))
    (images / "bad.depth.npy").write_bytes(b"not an array")
    config = tmp_path / "depth_file.yaml"
    config.write_text("depth:\n  backend: file\n")
    proc = subprocess.run([*run, "--config", str(config), "--store", str(tmp_path / "store2")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "Traceback" not in err, err[-3000:]
    assert err.count("bad.depth.npy: cannot read depth") == 1, err[-3000:]
    assert err.count("no prompt file good.txt") == 1, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: 1 scene(s) failed: ['bad']")


def test_progress_counts_this_runs_scenes_and_units(smoke_store):
    """The progress bar counted every done unit in the store against the configured scene count (a retry of one
    scene showed 32/32 at its start); it now counts this run's units whose key this config gives them."""
    from lyra_pipeline.cli import _done_units, planned_units
    from lyra_pipeline.config import build_config
    from lyra_pipeline.storage import RunStore

    st = RunStore(smoke_store, create=False)
    cfg = build_config("smoke", {"scenes": {"num_scenes": 3}})
    units = planned_units(cfg, None)
    assert len(units) == 3 * 38 and _done_units(st, units) == len(units)
    one = planned_units(cfg, ["proc-000001"])
    assert len(one) == 38 and {s for s, _, _ in one} == {"proc-000001"} and _done_units(st, one) == 38
    changed = planned_units(build_config("smoke", {"scenes": {"num_scenes": 3}, "mask": {"threshold": 0.05}}), None)
    done = _done_units(st, changed)  # refine, generate and what follows must be redone under the new key
    assert done == 3 * (2 + 6 * 2), done  # input, depth + cameras, warp per trajectory
