"""Bad input found in an input sweep: each is refused with one line `error: <file/field>: <what is wrong, expected
form>` and exit code 2, before anything is written (no store, no output file, an existing file unchanged)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lyra_pipeline.cli import app

runner = CliRunner()


def one_error(res, *parts: str, alone: bool = True) -> str:
    """The run ended with exit code 2 and one `error:` line (the last; with ``alone`` the only line) that holds
    every one of ``parts``; no exception escaped (a traceback)."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.output
    if alone:
        assert len(lines) == 1, res.output
    for part in parts:
        assert part in errors[0], (part, errors[0])
    return errors[0]


def _png(path: Path, height: int, width: int, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _broken_image(path: Path, case: str, seed: int) -> tuple[Path, str]:
    """An image file that is ``undecodable``, ``truncated`` (half of a PNG) or ``1x1``, and what its error says."""
    if case == "undecodable":
        path.write_bytes(b"not an image at all")
    elif case == "truncated":
        data = _png(path.with_name("whole.png"), 64, 64, seed=seed).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        _png(path, 1, 1)
    return path, "expected at least 8x8" if case == "1x1" else "cannot decode image"


@pytest.fixture(scope="module")
def one_scene_store(tmp_path_factory) -> Path:
    """A finished 1-scene smoke store (read only here: every command below fails before writing)."""
    from tests.conftest import make_smoke_store

    return make_smoke_store(tmp_path_factory.mktemp("sweep") / "store", num_scenes=1)


# --- 1. --config --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["binary", "folder"])
def test_config_binary_file_or_folder_is_one_line(tmp_path, kind):
    """Before: UnicodeDecodeError / IsADirectoryError tracebacks."""
    config = tmp_path / "conf.yaml"
    if kind == "binary":
        config.write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    else:
        config.mkdir()
    store = tmp_path / "store"
    res = runner.invoke(app, ["run", "--preset", "smoke", "--config", str(config), "--store", str(store)])
    one_error(res, str(config), "expects a YAML file", "not UTF-8 text" if kind == "binary" else "is a folder")
    assert not store.exists()


# --- 2. custom trajectories -----------------------------------------------------------------------------------


def _trajectory_json(path: Path, frames: int = 3, **top) -> Path:
    frame = {"c2w": np.eye(4).tolist(), "fx": 100.0, "fy": 100.0, "cx": 80.0, "cy": 48.0}
    doc = {"image_height": 96, "image_width": 160, "frames": [dict(frame) for _ in range(frames)], **top}
    path.write_text(json.dumps(doc))
    return path


def _bad_trajectory(tmp_path: Path, case: str) -> tuple[Path, tuple[str, ...]]:
    eye = np.tile(np.eye(4), (3, 1, 1))
    k = np.tile(np.array([[100.0, 0, 80], [0, 100, 48], [0, 0, 1]]), (3, 1, 1))
    if case == "object-npz":
        path = tmp_path / "objects.npz"
        np.savez(path, w2c=np.array([{"a": 1}] * 3, dtype=object), intrinsics=k)
        return path, ("field 'w2c'", "numeric array")
    if case == "random-npz":
        path = tmp_path / "random.npz"
        path.write_bytes(np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8).tobytes())
        return path, ("not a valid .npz archive of numeric arrays", "w2c (N,4,4)")
    if case == "height-0":
        return _trajectory_json(tmp_path / "h0.json", image_height=0), ("field 'image_height'", "positive integer")
    if case == "width-0":
        return _trajectory_json(tmp_path / "w0.json", image_width=0), ("field 'image_width'", "positive integer")
    if case == "height-text":
        return (_trajectory_json(tmp_path / "tall.json", image_height="tall"),
                ("field 'image_height'", "positive integer", "'tall'"))
    if case == "fx-text":
        path = _trajectory_json(tmp_path / "fx.json")
        doc = json.loads(path.read_text())
        doc["frames"][1]["fx"] = "abc"
        path.write_text(json.dumps(doc))
        return path, ("frames[1].fx", "must be a number", "'abc'")
    assert case == "npz-height-0"
    path = tmp_path / "h0.npz"
    np.savez(path, w2c=eye, intrinsics=k, image_height=0, image_width=160)
    return path, ("field 'image_height'", "positive integer")


@pytest.mark.parametrize("case", ["object-npz", "random-npz", "height-0", "width-0", "height-text", "fx-text",
                                  "npz-height-0"])
def test_bad_custom_trajectory_is_one_line(tmp_path, case):
    """Before: ValueError / ZeroDivisionError tracebacks, and for random bytes a message suggesting an unsafe
    (pickle) load."""
    path, parts = _bad_trajectory(tmp_path, case)
    store = tmp_path / "store"
    res = runner.invoke(app, ["run", "--preset", "smoke", "--trajectory", str(path), "--store", str(store)])
    line = one_error(res, str(path), *parts)
    assert "pickle" not in line and "unsafe" not in line
    assert not store.exists()


def test_one_frame_custom_path_is_refused(tmp_path):
    """Before: `trajectories.frames: all` on a 1-frame path ran a still "trajectory" (exit 0)."""
    path = _trajectory_json(tmp_path / "one.json", frames=1)
    config = tmp_path / "all.yaml"
    config.write_text("trajectories:\n  frames: all\n")
    store = tmp_path / "store"
    res = runner.invoke(app, ["run", "--preset", "smoke", "--config", str(config), "--trajectory", str(path),
                              "--num-scenes", "1", "--store", str(store)])
    one_error(res, str(path), "1 frame", "at least 2 frames")
    assert not store.exists()


# --- 3. and 4. input images -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["undecodable", "truncated", "1x1"])
def test_images_folder_with_a_broken_image_fails_before_any_work(tmp_path, case):
    """Before: Prefect started, ran ~45 s, failed the scene and left a store."""
    images = tmp_path / "images"
    images.mkdir()
    _png(images / "good.png", 32, 48)
    bad, says = _broken_image(images / "bad.png", case, seed=3)
    store = tmp_path / "store"
    res = runner.invoke(app, ["run", "--preset", "smoke", "--images", str(images), "--store", str(store)])
    one_error(res, str(bad), says)
    assert not store.exists()


@pytest.mark.parametrize("case", ["truncated", "1x1"])
def test_reconstruct_with_a_broken_image_writes_nothing(tmp_path, case):
    image, says = _broken_image(tmp_path / "photo.png", case, seed=4)
    out = tmp_path / "recon"
    res = runner.invoke(app, ["reconstruct", "--image", str(image), "--out", str(out), "--preset", "smoke",
                              "--store", str(tmp_path / "no_store")])
    one_error(res, str(image), says)
    assert not out.exists()


def _crop_warnings(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "keeps only" in r.getMessage() and name in r.getMessage()]


def test_a_strip_image_warns_that_the_crop_keeps_little_of_it(tmp_path, caplog):
    """A 4000x8 image silently became 13 of its columns scaled 12x; now one warning names the file (here the
    folder's second image is broken, so the run stops in its preflight, after the warning)."""
    images = tmp_path / "images"
    images.mkdir()
    strip = _png(images / "a_strip.png", 8, 4000, seed=5)
    (images / "b_broken.png").write_bytes(b"broken")
    store = tmp_path / "store"
    with caplog.at_level(logging.WARNING):
        res = runner.invoke(app, ["run", "--preset", "smoke", "--images", str(images), "--store", str(store),
                                  "--num-scenes", "2"])
    one_error(res, "b_broken.png", "cannot decode image")
    warned = _crop_warnings(caplog, str(strip))
    assert len(warned) == 1 and "4000x8" in warned[0] and "0.3%" in warned[0], warned
    assert not store.exists()
    # an image of the video's aspect does not warn
    caplog.clear()
    from lyra_pipeline.inputs import load_image

    with caplog.at_level(logging.WARNING):
        load_image(_png(tmp_path / "fine.png", 60, 100, seed=6), 96, 160)
    assert not _crop_warnings(caplog, "fine.png")


def test_reconstruct_warns_on_a_strip_image(tmp_path, caplog):
    """reconstruct --image checks (and warns) at the preset's video size, before anything is written (the missing
    checkpoint stops it right after the check here)."""
    strip = _png(tmp_path / "strip.png", 8, 4000, seed=7)
    out = tmp_path / "recon"
    with caplog.at_level(logging.WARNING):
        res = runner.invoke(app, ["reconstruct", "--image", str(strip), "--out", str(out), "--preset", "smoke",
                                  "--checkpoint", str(tmp_path / "missing.safetensors")])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert len(_crop_warnings(caplog, str(strip))) == 1
    assert not out.exists()


# --- 5. output paths ------------------------------------------------------------------------------------------


def test_export_ply_into_an_existing_folder_is_refused_first(tmp_path, one_scene_store):
    """Before: a traceback after decoding (IsADirectoryError)."""
    folder = tmp_path / "scene.ply"
    folder.mkdir()
    res = runner.invoke(app, ["export-ply", "proc-000000", "--store", str(one_scene_store), "--out", str(folder)])
    one_error(res, str(folder), "is an existing folder", "expects a file path")
    assert list(folder.iterdir()) == []


def test_reconstruct_out_an_existing_file_is_one_line(tmp_path):
    """Before: NotADirectoryError traceback."""
    image = _png(tmp_path / "photo.png", 32, 48, seed=8)
    out = tmp_path / "result"
    out.write_text("keep me")
    res = runner.invoke(app, ["reconstruct", "--image", str(image), "--out", str(out), "--preset", "smoke",
                              "--store", str(tmp_path / "no_store")])
    one_error(res, str(out), "existing file", "expected an output folder")
    assert out.read_text() == "keep me"


# --- 6. lyra view ---------------------------------------------------------------------------------------------


def test_view_missing_ply_and_other_files_are_one_line(tmp_path, monkeypatch):
    """Before: FileNotFoundError traceback; `notes.txt` was read as a scene id (./lyra_store: not a lyra store)."""
    pytest.importorskip("viser")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["view", "missing.ply"])
    one_error(res, "missing.ply", "file not found", "a .ply file", "scene id")
    (tmp_path / "notes.txt").write_text("hello")
    res = runner.invoke(app, ["view", "notes.txt"])
    one_error(res, "notes.txt", "not a .ply or .sequence.json file", "scene id")
    assert not (tmp_path / "lyra_store").exists()


def test_view_bad_port_exits_instead_of_hanging(tmp_path):
    """Before: viser's server thread died on --port -1 and the process waited for it forever."""
    pytest.importorskip("viser")
    import torch

    from lyra_ops.gaussians import Gaussians

    ply = tmp_path / "tiny.ply"
    n = 4
    Gaussians(means=torch.rand(n, 3), scales=torch.full((n, 3), 0.01), quats=torch.tensor([[1.0, 0, 0, 0]] * n),
              opacities=torch.full((n,), 0.5), colors=torch.rand(n, 3)).to_ply(ply)
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's package, whatever is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    for port in ("-1", "70000"):
        proc = subprocess.run([sys.executable, "-m", "lyra_pipeline.cli", "view", str(ply), "--port", port],
                              capture_output=True, text=True, timeout=90, cwd=tmp_path, env=env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines() == [f"error: --port {port}: expected a TCP port 1-65535, or 0 for "
                                                    "any free port"], proc.stderr


# --- 7. lyra inspect ------------------------------------------------------------------------------------------


def test_inspect_unknown_trajectory_names_the_available_ones(tmp_path, one_scene_store, monkeypatch):
    """Before: exit 0 with an empty sheet."""
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["inspect", "proc-000000", "--store", str(one_scene_store), "--trajectory", "nosuch"])
    one_error(res, "--trajectory", "'nosuch'", "left", "zoom_out")
    assert list(tmp_path.iterdir()) == []


def test_inspect_array_without_image_form_writes_nothing(tmp_path, one_scene_store):
    """Before: ffmpeg failed on the 3x3 K, and the command printed "wrote x.mp4", left 0 bytes and exited 0."""
    out = tmp_path / "x.mp4"
    res = runner.invoke(app, ["inspect", "proc-000000", "--store", str(one_scene_store), "--array", "input/K",
                              "--out", str(out)])
    one_error(res, "input/K", "no image form", "(T,3,H,W)")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_inspect_failing_encoder_leaves_no_partial_file(tmp_path, one_scene_store, monkeypatch):
    """An encoder that fails: exit 2 naming the file, the old file unchanged, no partial file beside it."""
    pytest.importorskip("imageio_ffmpeg")
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\ncat > /dev/null\necho 'Unknown encoder libx264' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(fake))
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "teacher.mp4"
    out.write_bytes(b"old video")
    res = runner.invoke(app, ["inspect", "proc-000000", "--store", str(one_scene_store), "--array",
                              "trajectories/left/teacher/rgb", "--out", str(out)])
    one_error(res, str(out), "ffmpeg could not encode", "Unknown encoder libx264", alone=False)
    assert "wrote" not in res.output
    assert out.read_bytes() == b"old video" and [p.name for p in folder.iterdir()] == ["teacher.mp4"]
