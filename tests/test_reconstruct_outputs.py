"""What `lyra reconstruct` / `refine` / `export-ply` say and write (issue 28 items 1, 4 and 7).

* The stand-ins that made a scene (the planar depth prior, the warp_only teacher) are said in one line each
  where they are used, in the summary line and in the export's sidecar JSON / HTML title.
* `reconstruct --depth FILE` (.npy in metres, 16-bit PNG in millimetres) is the stored depth; bad files are one
  line and nothing is written.
* Outputs are content-addressed (``<stem>.export.json``): a finished command re-run with the same inputs writes
  no byte and says ``up to date``; the HTML viewer's bytes are reproducible.

A tiny random decoder stands in for the shipped one (as in ``test_shipped_decoder``), with the smoke preset.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lyra_pipeline.cli import app, process_started, run_time_line
from lyra_pipeline.reconstruct import read_depth_file, refine_summary, reproducible_html, splat_transform_command
from lyra_pipeline.storage import RunStore

runner = CliRunner()
DEPTH_LINE = ("depth: planar prior: the same geometry for every image; set depth.backend: transformers with a local "
              "model folder, or put NAME.depth.npy beside the image, or pass --depth FILE")
GENERATOR_LINE = "generator: warp_only: what the image does not show is filled by push-pull, not generated; "

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def sample(examples_dir) -> Path:
    return examples_dir / "samples" / "00.png"


def reconstruct(*args: str):
    return runner.invoke(app, ["reconstruct", "--preset", "smoke", "--store", "/nonexistent-lyra-store", *args])


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root``: its bytes and mtime."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------------------
# Fallback lines, summary, sidecar, up to date
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reconstructed(shipped, sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("fallbacks") / "R"
    res = reconstruct("--image", str(sample), "--out", str(out))
    assert res.exit_code == 0, res.output
    return out, res.output


def test_reconstruct_says_each_fallback_in_one_line(reconstructed):
    out, output = reconstructed
    said = lines(output)
    assert said.count(DEPTH_LINE) == 1, output
    generator = [line for line in said if line.startswith("generator:")]
    assert len(generator) == 1 and generator[0].startswith(GENERATOR_LINE), output
    assert "configure a local video model" in generator[0]
    wrote = said[-1]
    assert wrote.startswith(f"wrote {out / '00.ply'} (") and "of them the backdrop" in wrote, output
    assert wrote.endswith("; fallbacks: depth planar prior, generator warp_only"), wrote
    assert "decoder" not in wrote  # the `decoder: ...` line above already says it
    doc = json.loads((out / "00.export.json").read_text())
    assert doc["made_with"] == [DEPTH_LINE, generator[0]]
    assert doc["summary"] == wrote
    assert set(doc["outputs"]) == {"00.ply", "00.png"}


def test_reconstruct_rerun_writes_nothing_and_says_up_to_date(reconstructed, shipped, sample):
    out, _ = reconstructed
    before = snapshot(out)
    res = reconstruct("--image", str(sample), "--out", str(out))
    assert res.exit_code == 0, res.output
    assert snapshot(out) == before  # not a byte, not an mtime: the store included
    said = lines(res.output)
    assert said[-1].startswith(f"up to date: {out / '00.ply'} ("), res.output
    assert said.count(DEPTH_LINE) == 1 and sum(line.startswith(GENERATOR_LINE) for line in said) == 1
    assert not any(line.startswith(("wrote", "decoder:")) for line in said), res.output


@pytest.mark.slow  # two exports (~20 s)
def test_changed_options_or_outputs_are_not_up_to_date(reconstructed, shipped, sample, tmp_path):
    """Another export option, or an output edited by hand: the export is redone (the scene's stages reused)."""
    import shutil

    out = Path(shutil.copytree(reconstructed[0], tmp_path / "R"))
    res = reconstruct("--image", str(sample), "--out", str(out), "--smoothing", "0.1")
    assert res.exit_code == 0, res.output
    assert "up to date" not in res.output and "scene 00: all " in res.output, res.output
    assert lines(res.output)[-1].startswith("wrote "), res.output
    (out / "00.png").write_bytes(b"edited")
    res = reconstruct("--image", str(sample), "--out", str(out), "--smoothing", "0.1")
    assert res.exit_code == 0 and lines(res.output)[-1].startswith("wrote "), res.output
    assert (out / "00.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------------------
# --depth FILE
# ------------------------------------------------------------------------------------------------------------


def video_sized_image(path: Path) -> Path:
    """A structured 160x96 image: the smoke preset's video size, so the stored depth is the file's unresized."""
    y, x = np.mgrid[0:96, 0:160]
    rgb = np.stack([(x * 1.5) % 256, (y * 2.5) % 256, ((x // 8 + y // 8) % 2) * 180 + 40], axis=-1)
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    path.with_suffix(".txt").write_text("a test room", encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["npy", pytest.param("png", marks=pytest.mark.slow)])  # png: also unit-tested
def test_depth_file_is_the_stored_depth(shipped, tmp_path, kind):
    image = video_sized_image(tmp_path / "room.png")
    rng = np.random.default_rng(0)
    metres = rng.uniform(0.5, 40.0, size=(96, 160)).astype(np.float32)
    if kind == "npy":
        depth_file, expected = tmp_path / "depth.npy", metres
        np.save(depth_file, metres)
    else:
        millimetres = np.round(metres * 1000).astype(np.uint16)
        depth_file, expected = tmp_path / "depth.png", millimetres.astype(np.float32) / np.float32(1000.0)
        Image.fromarray(millimetres).save(depth_file)
        assert Image.open(depth_file).mode.startswith("I;16")
    out = tmp_path / "R"
    res = reconstruct("--image", str(image), "--out", str(out), "--depth", str(depth_file))
    assert res.exit_code == 0, res.output
    store = RunStore(out / "store", create=False)
    stored = store.read_array("room", "depth/depth")
    np.testing.assert_array_equal(stored, expected)
    assert store.scene_group("room")["depth/depth"].attrs["label"] == "file room.depth.npy"
    said = lines(res.output)
    assert not any(line.startswith("depth: planar prior") for line in said), res.output
    assert any(line.startswith(f"depth: {depth_file} (160x96, ") for line in said), res.output
    assert said[-1].endswith("; fallbacks: generator warp_only"), res.output


@pytest.mark.slow  # two reconstructions (~20 s)
def test_a_new_depth_file_in_the_same_folder_is_a_new_depth(shipped, tmp_path):
    """The depth stage's key covers the map's bytes: the same image with another map re-runs the depth (and is
    not up to date)."""
    image = video_sized_image(tmp_path / "room.png")
    out = tmp_path / "R"
    for value in (3.0, 7.0):
        np.save(tmp_path / "d.npy", np.full((96, 160), value, np.float32))
        res = reconstruct("--image", str(image), "--out", str(out), "--depth", str(tmp_path / "d.npy"))
        assert res.exit_code == 0 and "up to date" not in res.output, res.output
        assert float(RunStore(out / "store", create=False).read_array("room", "depth/depth").max()) == value


@pytest.mark.slow  # one reconstruction (~10 s)
def test_depth_beside_the_image_is_used(shipped, tmp_path):
    image = video_sized_image(tmp_path / "room.png")
    np.save(tmp_path / "room.depth.npy", np.full((96, 160), 4.5, np.float32))
    res = reconstruct("--image", str(image), "--out", str(tmp_path / "R"))
    assert res.exit_code == 0, res.output
    assert DEPTH_LINE not in res.output
    assert float(RunStore(tmp_path / "R" / "store", create=False).read_array("room", "depth/depth").min()) == 4.5


def test_png_depth_is_millimetres_and_a_depth_of_the_image_aspect_is_accepted(tmp_path):
    """The 16-bit PNG reader (the CLI test of it is slow): metres = millimetres / 1000, exactly; a map of
    another size at the image's aspect ratio passes the size check (it is resized with the image)."""
    mm = np.arange(1, 96 * 160 + 1, dtype=np.uint16).reshape(96, 160)
    Image.fromarray(mm).save(tmp_path / "d.png")
    depth = read_depth_file(tmp_path / "d.png", 96, 160)
    np.testing.assert_array_equal(depth.numpy(), mm.astype(np.float32) / np.float32(1000.0))
    np.save(tmp_path / "half.npy", np.ones((357, 640), np.float32))
    assert tuple(read_depth_file(tmp_path / "half.npy", 714, 1280).shape) == (357, 640)


@pytest.mark.parametrize("case, message", [
    ("size", "--depth is 100x50 but the image is 1280x714; expected the image's size or the same aspect ratio"),
    ("png8", "--depth PNG is L with shape (714, 1280); expected a 16-bit greyscale PNG"),
    ("zero_mm", "pixels of 0 mm (no measurement)"),
    ("exr", "--depth EXR is not read"),
    ("nan", "depth must be finite and > 0 everywhere"),
    ("3d", "depth must be a 2-D (H, W) array"),
    ("txt", "--depth must end in .npy or .png"),
    ("missing", "--depth file not found"),
])  # fmt: skip
def test_bad_depth_files_are_one_line_and_write_nothing(shipped, sample, tmp_path, case, message):
    path = tmp_path / {"size": "d.npy", "png8": "d.png", "zero_mm": "d.png", "exr": "d.exr", "nan": "d.npy",
                       "3d": "d.npy", "txt": "d.txt", "missing": "absent.npy"}[case]
    if case == "size":
        np.save(path, np.ones((50, 100), np.float32))
    elif case == "png8":
        Image.fromarray(np.full((714, 1280), 9, np.uint8)).save(path)
    elif case == "zero_mm":
        mm = np.full((714, 1280), 2000, np.uint16)
        mm[5, 7] = 0
        Image.fromarray(mm).save(path)
    elif case == "nan":
        np.save(path, np.full((714, 1280), np.nan, np.float32))
    elif case == "3d":
        np.save(path, np.ones((714, 1280, 3), np.float32))
    elif case in ("exr", "txt"):
        path.write_bytes(b"not a depth map")
    out = tmp_path / "R"
    res = reconstruct("--image", str(sample), "--out", str(out), "--depth", str(path))
    assert res.exit_code == 2, res.output
    said = lines(res.output)
    assert len(said) == 1 and said[0].startswith("error: ") and message in said[0], res.output
    assert not out.exists()


def test_depth_with_a_prompt_is_one_line(tmp_path):
    res = reconstruct("--prompt", "a red barn", "--depth", str(tmp_path / "d.npy"), "--out", str(tmp_path / "R"))
    assert res.exit_code == 2 and "--depth: a depth map goes with --image" in res.output, res.output
    assert not (tmp_path / "R").exists()


# ------------------------------------------------------------------------------------------------------------
# Reproducible HTML, summaries
# ------------------------------------------------------------------------------------------------------------


def zip_bytes(when: tuple[int, int, int, int, int, int]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in (("meta.json", b'{"a": 1}'), ("means_l.webp", bytes(range(200)))):
            z.writestr(zipfile.ZipInfo(name, date_time=when), data)
    return buf.getvalue()


def page(zip_data: bytes) -> bytes:
    return (b"<html><head><title>SuperSplat Viewer</title></head><body><script>fetch(\"data:application/"
            b"octet-stream;base64," + base64.b64encode(zip_data) + b"\")</script></body></html>")


def test_viewer_html_is_reproducible_and_titled():
    """splat-transform stamps its embedded ZIP's entries with the wall clock: fixed, two writes are one page."""
    early, late = page(zip_bytes((2025, 3, 1, 10, 20, 30))), page(zip_bytes((2026, 1, 2, 23, 58, 0)))
    assert early != late
    title = "00.ply · lyra scene 00 · fallbacks: depth planar prior, generator warp_only <&>"
    a, b = reproducible_html(early, title), reproducible_html(late, title)
    assert a == b
    assert b"<title>00.ply \xc2\xb7 lyra scene 00 \xc2\xb7 fallbacks: depth planar prior, generator warp_only " \
           b"&lt;&amp;&gt;</title>" in a
    data = base64.b64decode(a.split(b"base64,")[1].split(b'"')[0])
    with zipfile.ZipFile(io.BytesIO(data)) as z:  # still a valid archive, same contents
        assert z.testzip() is None
        assert [(i.filename, i.date_time) for i in z.infolist()] == [("meta.json", (1980, 1, 1, 0, 0, 0)),
                                                                     ("means_l.webp", (1980, 1, 1, 0, 0, 0))]
        assert z.read("means_l.webp") == bytes(range(200))


def test_refine_summary_says_what_psnr_is_measured_against():
    result = {"scene": "00", "name": "refine-abc", "steps": 300, "init": "decoder: shipped", "held_out_frames": 72,
              "psnr_before": {"input_mean": 26.17, "white": 24.0, "grey": 25.0},
              "psnr_after": {"input_mean": 35.76, "white": 35.0, "grey": 35.5}, "gaussians_after": 1000}
    line = refine_summary(result, "warp_only")
    assert "PSNR vs the warp_only re-projections (not ground truth) on 72 teacher frames it did not fit " \
           "26.17 -> 35.76 dB" in line
    assert "(generated, not ground truth)" in refine_summary(result, "diffusers")
    assert "not ground truth" not in refine_summary(result, "oracle")


def test_run_time_line_accounts_for_the_wall_time():
    line = run_time_line(100.0, 130.0, 180.0, 181.8, 184.0, process=90.0)
    assert line == ("94.0 s in all: 10.0 s starting Python and the CLI, 30.0 s checks and imports, 50.0 s starting "
                    "Prefect and the flow (its local server, input checks), 1.8 s scene work, 2.2 s Prefect's "
                    "wrap-up")
    assert run_time_line(100.0, 130.0, 180.0, 181.8, 184.0, process=-1e6).startswith("84.0 s in all: 30.0 s")
    started = process_started()
    import time

    assert started is None or started <= time.time() + 1.0


# ------------------------------------------------------------------------------------------------------------
# reconstruct --refine --html re-run: not a byte changes (slow: refinement + two splat-transform runs)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(splat_transform_command() is None, reason="node/npx not installed")
def test_refine_html_rerun_changes_no_byte(shipped, sample, tmp_path):
    out = tmp_path / "R"
    args = ["--image", str(sample), "--out", str(out), "--refine", "5", "--html"]
    first = reconstruct(*args)
    assert first.exit_code == 0, first.output
    assert "PSNR vs the warp_only re-projections (not ground truth)" in first.output, first.output
    title = "<title>00.ply · lyra scene 00 · fallbacks: depth planar prior, generator warp_only</title>"
    assert title.encode() in (out / "00.html").read_bytes()
    before = snapshot(out)
    again = reconstruct(*args)
    assert again.exit_code == 0, again.output
    assert snapshot(out) == before
    assert lines(again.output)[-1].startswith(f"up to date: {out / '00.ply'} ("), again.output
    # without its sidecar the export is redone from the reused scene and refinement, to the same bytes
    (out / "00.export.json").unlink()
    redo = reconstruct(*args)
    assert redo.exit_code == 0, redo.output
    assert "scene 00: all " in redo.output and "refine 00: refine-" in redo.output and " reused " in redo.output
    after = snapshot(out)
    for name in ("00.ply", "00.png", "00.html", "00.viewer.json", "00.export.json"):
        assert after[name][0] == before[name][0], f"{name} differs when written again"
