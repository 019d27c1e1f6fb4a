"""The distill-decoder flow through Prefect, PLY export/round trip, and PlayCanvas splat-transform interop."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lyra_ops.distill import INFERENCE, build_batch, render_batch
from lyra_ops.errors import LyraInputError
from lyra_ops.gaussians import SH_C0, Gaussians
from lyra_ops.latents import PixelPatchifyEncoder
from lyra_ops.metrics import psnr
from lyra_pipeline.reconstruct import (
    ExportOptions,
    chromium_path,
    decode_scene,
    export_scene,
    load_decoder,
    splat_transform,
    splat_transform_command,
    viewer_screenshot,
    viewer_settings,
)
from lyra_pipeline.storage import RunStore
from lyra_pipeline.training import LATEST, read_metrics
from tests.conftest import check_train_files_documented

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"stages": [{"name": "views_1", "steps": 4, "targets": 2},
                    {"name": "prune", "steps": 2, "targets": 2, "prune_ratio": 0.8, "opacity_weight": 0.1}],
         "checkpoint_every": 2}


@pytest.fixture(scope="module")
def trained_store(smoke_store_template, tmp_path_factory, prefect_harness):
    """One smoke store trained by the flow, shared by this module's tests (which only read it)."""
    import shutil

    from flows.distill_decoder import distill_decoder

    path = Path(shutil.copytree(smoke_store_template, tmp_path_factory.mktemp("trained") / "store"))
    summary = distill_decoder(store=str(path), preset="smoke", overrides=TRAIN)
    return path, summary


def all_files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_flow_trains_validates_and_rerun_does_nothing(trained_store, prefect_harness):
    from flows.distill_decoder import distill_decoder

    store_path, summary = trained_store
    assert summary["step"] == 6 and summary["steps_computed"] == 6
    assert summary["scenes"] == 1 and summary["frames"] == 6 * 9  # one held-out scene, 6 paths x 9 frames
    assert 0 < summary["psnr_gt"] < 60 and 0 <= summary["ssim_gt"] <= 1
    store = RunStore(store_path)
    run = summary["run"]
    assert [r["stage"] for r in read_metrics(store, run).to_pylist()] == ["views_1"] * 4 + ["prune"] * 2
    assert store.read_file(LATEST) is not None
    eval_rows = store.read_table(RunStore.train_rel(run, "eval.parquet")).to_pylist()
    run_doc = json.loads(store.read_file(RunStore.train_rel(run, "run.json")))
    assert {r["scene_id"] for r in eval_rows} == set(run_doc["val_scenes"])
    assert not set(run_doc["val_scenes"]) & set(run_doc["train_scenes"])
    before = all_files(store_path / "train")
    again = distill_decoder(store=str(store_path), preset="smoke", overrides=TRAIN)
    assert again["steps_computed"] == 0 and again["computed"] is False
    assert all_files(store_path / "train") == before


def test_prefect_yaml_deployments_point_at_flows():
    import importlib

    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in doc["deployments"]}
    assert {"generate-dataset", "distill-decoder", "retrain-decoder"} <= set(by_name)
    for dep in doc["deployments"]:
        module, func = dep["entrypoint"].split(":")
        fn = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), func)
        params = fn.parameters.properties  # Prefect's parameter schema of the flow
        assert set(dep["parameters"]) <= set(params), dep["name"]
    from prefect.client.schemas.schedules import CronSchedule

    cron = by_name["retrain-decoder"]["schedules"][0]["cron"]
    assert CronSchedule(cron=cron).cron == cron


def test_export_ply_round_trips_and_renders_the_same(trained_store, tmp_path):
    store_path, summary = trained_store
    store = RunStore(store_path)
    scene_id = sorted(store.scene_ids())[0]
    res = export_scene(str(store_path), scene_id, tmp_path / "scene.ply",
                       options=ExportOptions(smoothing=0.0, backdrop="none"))
    assert res.gaussians > 0 and res.strip is not None and res.strip.stat().st_size > 0
    model, _ = load_decoder(store, None)
    gaussians, views, trajectories = decode_scene(model, store, scene_id)
    back = Gaussians.from_ply(res.ply)
    assert back.num == gaussians.num
    torch.testing.assert_close(back.means, gaussians.means)
    torch.testing.assert_close(back.colors, gaussians.colors, atol=1e-6, rtol=0)
    torch.testing.assert_close(back.scales, gaussians.scales, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(back.opacities, gaussians.opacities, atol=1e-6, rtol=0)
    torch.testing.assert_close(back.quats, gaussians.quats, atol=1e-6, rtol=0)
    view = views.get(scene_id, trajectories[0])
    batch = build_batch([view], list(range(9)), [0, 4, 8], INFERENCE, PixelPatchifyEncoder())
    a, b = render_batch(gaussians, batch).rgb, render_batch(back, batch).rgb
    assert float(psnr(a, b).min()) > 60


@pytest.mark.skipif(splat_transform_command() is None, reason="node/npx not installed")
def test_splat_transform_reads_our_ply(trained_store, tmp_path):
    store_path, _ = trained_store
    scene_id = sorted(RunStore(store_path).scene_ids())[0]
    res = export_scene(str(store_path), scene_id, tmp_path / "scene.ply", strip=False)
    ours = Gaussians.from_ply(res.ply)
    out = splat_transform(res.ply, tmp_path / "scene.csv")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == ours.num

    def col(*names: str) -> torch.Tensor:
        return torch.tensor([[float(r[n]) for n in names] for r in rows], dtype=torch.float64)

    # splat-transform may reorder rows: compare after sorting both by position
    theirs_means = col("x", "y", "z")
    order_t = torch.argsort(theirs_means[:, 0] * 1e6 + theirs_means[:, 1] * 1e3 + theirs_means[:, 2])
    means = ours.means.double()
    order_o = torch.argsort(means[:, 0] * 1e6 + means[:, 1] * 1e3 + means[:, 2])
    torch.testing.assert_close(theirs_means[order_t], means[order_o], atol=1e-6, rtol=0)
    rgb = 0.5 + SH_C0 * col("f_dc_0", "f_dc_1", "f_dc_2")[order_t]
    torch.testing.assert_close(rgb, ours.colors.double()[order_o], atol=1e-5, rtol=0)
    opacity = torch.sigmoid(col("opacity")[order_t, 0])
    torch.testing.assert_close(opacity, ours.opacities.double()[order_o], atol=1e-5, rtol=0)
    scales = torch.exp(col("scale_0", "scale_1", "scale_2")[order_t])
    torch.testing.assert_close(scales, ours.scales.double()[order_o], rtol=1e-4, atol=1e-7)


def test_export_options_keep_what_they_say_and_bad_ones_write_nothing(trained_store, tmp_path):
    store_path, _ = trained_store
    store = RunStore(store_path)
    scene_id = sorted(store.scene_ids())[0]
    model, _ = load_decoder(store, None)
    gaussians, _, _ = decode_scene(model, store, scene_id)
    options = ExportOptions(prune_ratio=0.5, min_opacity=0.2, layout="inria", backdrop="none")
    res = export_scene(str(store_path), scene_id, tmp_path / "pruned.ply", strip=False, options=options)
    expected = gaussians.select_for_export(0.5, 0.2)
    assert res.gaussians == expected.num < gaussians.num
    back = Gaussians.from_ply(res.ply)
    torch.testing.assert_close(back.means, expected.means)
    assert b"property float f_rest_44" in res.ply.read_bytes()[:4096]
    # --smoothing 0.2 widens each Gaussian by 0.2 squared input pixels at its distance from the input camera (the
    # default PLY is as decoded; the HTML viewer's copy is widened by viewer_smoothing)
    smooth = Gaussians.from_ply(export_scene(str(store_path), scene_id, tmp_path / "smooth.ply", strip=False,
                                             options=ExportOptions(smoothing=0.2)).ply)
    plain = Gaussians.from_ply(export_scene(str(store_path), scene_id, tmp_path / "plain.ply", strip=False).ply)
    torch.testing.assert_close(plain.scales[: gaussians.num], gaussians.scales, rtol=1e-5, atol=1e-7)
    _, views, trajectories = decode_scene(model, store, scene_id)
    cam = views.get(scene_id, trajectories[0]).cameras
    d = (gaussians.means - cam.c2w[0, :3, 3]).norm(dim=-1, keepdim=True)
    expected_scales = torch.sqrt(gaussians.scales.square() + 0.2 * (d / cam.K[0, 0, 0]).square())
    torch.testing.assert_close(smooth.scales[: gaussians.num], expected_scales, rtol=1e-5, atol=1e-7)
    for bad in ({"prune_ratio": 1.0}, {"min_opacity": -1.0}, {"layout": "splat"}, {"smoothing": -0.1},
                {"backdrop": "black"}, {"viewer_smoothing": 5.0}):
        with pytest.raises(LyraInputError, match="--"):
            ExportOptions(**bad)
    with pytest.raises(LyraInputError, match="--backdrop: expected one of auto, none, got 'black'"):
        ExportOptions(backdrop="black")
    # through the CLI: one line, exit 2, nothing written
    out = tmp_path / "bad" / "scene.ply"
    proc = subprocess.run([sys.executable, "-m", "lyra_pipeline.cli", "export-ply", scene_id, "--store",
                           str(store_path), "--out", str(out), "--layout", "splat"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert "--layout: expected one of compact, inria" in proc.stderr + proc.stdout and not out.parent.exists()


@pytest.mark.skipif(splat_transform_command() is None, reason="node/npx not installed")
def test_splat_transform_reads_the_inria_layout(trained_store, tmp_path):
    store_path, _ = trained_store
    scene_id = sorted(RunStore(store_path).scene_ids())[0]
    res = export_scene(str(store_path), scene_id, tmp_path / "scene.ply", strip=False,
                       options=ExportOptions(layout="inria"))
    ours = Gaussians.from_ply(res.ply)
    out = splat_transform(res.ply, tmp_path / "scene.csv")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == ours.num and {"nx", "f_rest_44", "rot_3"} <= set(rows[0])
    got = torch.tensor(sorted(float(r["x"]) for r in rows), dtype=torch.float64)
    torch.testing.assert_close(got, ours.means[:, 0].double().sort().values, atol=1e-6, rtol=0)


@pytest.mark.skipif(splat_transform_command() is None, reason="node/npx not installed")
def test_export_ply_html_viewer(trained_store, tmp_path):
    store_path, _ = trained_store
    scene_id = sorted(RunStore(store_path).scene_ids())[0]
    res = export_scene(str(store_path), scene_id, tmp_path / "scene.ply", html=True, strip=False)
    text = res.html.read_text(errors="replace")
    assert res.html.stat().st_size > 10_000 and "<html" in text.lower()
    assert os.path.getsize(res.ply) > 0
    # the viewer opens at the input camera (identity pose: at the origin, looking down +z) over the decoder's
    # background, with the input camera's vertical field of view
    settings = json.loads(res.ply.with_suffix(".viewer.json").read_text())
    initial = settings["cameras"][0]["initial"]
    assert initial["position"] == [0.0, 0.0, 0.0] and initial["target"] == [0.0, 0.0, 1.0]
    K = RunStore(store_path).read_array(scene_id, "input/K")
    w = RunStore(store_path).read_array(scene_id, "input/rgb").shape[2]
    assert initial["fov"] == pytest.approx(math.degrees(2 * math.atan(w / (2 * K[0, 0]))), abs=1e-3)  # landscape


@pytest.mark.skipif(splat_transform_command() is None or chromium_path() is None,
                    reason="needs node/npx, playwright and a Chromium")
def test_html_viewer_opens_at_the_input_view(trained_store, tmp_path):
    """Headless Chromium screenshot of the exported viewer vs our own render of the input view (frame 0), both at
    twice the frame size (a viewer window larger than the 96 x 160 smoke frames; at 1:1, PlayCanvas culls splats
    under 2 px, so the one-per-pixel input Gaussians vanish and 38% of the window showed the background): the
    measure is PSNR, which must beat the input's flat mean colour by 3 dB, and at most 20% of the pixels may be
    the viewer's background (the decoder's background colour)."""
    import numpy as np

    from lyra_ops.distill import background_color
    from lyra_pipeline.quality import render_gaussians

    store_path, _ = trained_store
    scene_id = sorted(RunStore(store_path).scene_ids())[0]
    res = export_scene(str(store_path), scene_id, tmp_path / "scene.ply", html=True, strip=False)
    model, _ = load_decoder(RunStore(store_path), None)
    gaussians, views, trajectories = decode_scene(model, RunStore(store_path), scene_id)
    view = views.get(scene_id, trajectories[0])
    cams = view.cameras[torch.tensor([0])]
    cams = cams.resized(2 * cams.height, 2 * cams.width)
    ours = render_gaussians(gaussians, cams, background=background_color(view.frames[0], model.config.background))
    ours = ours.rgb[0]  # (3,H,W)
    h, w = ours.shape[1:]
    shot = viewer_screenshot(res.html, w, h, chromium_path())
    assert shot is not None and shot.shape == (h, w, 3)
    shot_t = torch.from_numpy(shot.copy()).permute(2, 0, 1).float() / 255
    bg = torch.tensor(json.loads(res.ply.with_suffix(".viewer.json").read_text())["background"]["color"])
    background_share = float(((shot_t - bg[:, None, None]).abs().max(dim=0).values < 2 / 255).float().mean())
    flat = ours.mean(dim=(1, 2), keepdim=True).expand_as(ours)
    p_viewer, p_flat = float(psnr(shot_t[None], ours[None])), float(psnr(flat[None], ours[None]))
    assert background_share < 0.2, background_share
    assert p_viewer > p_flat + 3.0, (p_viewer, p_flat)
    assert np.isfinite(p_viewer)


def test_viewer_settings_put_the_camera_at_a_pose():
    c2w = torch.eye(4)
    c2w[:3, :3] = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # looking down +x
    c2w[:3, 3] = torch.tensor([1.0, 2.0, 3.0])
    K = torch.tensor([[100.0, 0, 80], [0, 100.0, 45], [0, 0, 1]])
    s = viewer_settings(c2w, K, 90, 160, (0.2, 0.3, 0.4))
    # the viewer turns the splat 180 degrees about z: our (x, y, z) is its (-x, -y, z) (bench_viewer.py's
    # screenshots at held-out cameras line up with the exact renders only so)
    assert s["cameras"][0]["initial"]["position"] == [-1.0, -2.0, 3.0]
    assert s["cameras"][0]["initial"]["target"] == [-2.0, -2.0, 3.0]  # c2w[:3, 2] is the optical axis (+x here)
    assert s["cameras"][0]["initial"]["fov"] == pytest.approx(math.degrees(2 * math.atan(0.8)), abs=1e-3)  # along W
    portrait = viewer_settings(c2w, K, 160, 90, (0.2, 0.3, 0.4))
    assert portrait["cameras"][0]["initial"]["fov"] == pytest.approx(math.degrees(2 * math.atan(0.8)), abs=1e-3)
    assert s["background"]["color"] == [0.2, 0.3, 0.4]


def test_storage_layout_documents_training_files(trained_store):
    from lyra_pipeline.training import METRIC_SCHEMA
    from tasks.train import EVAL_SCHEMA

    store_path, _ = trained_store
    check_train_files_documented(store_path, "<run>", r"decoder-[0-9a-f]{12}", extra=("train/latest.json",))
    doc = (REPO / "storage_layout.md").read_text()
    for col in METRIC_SCHEMA.names + EVAL_SCHEMA.names:
        assert f"| `{col}` |" in doc, f"column {col} not documented"


def test_report_is_self_contained_and_renders(trained_store, tmp_path):
    import base64
    import io
    import re
    import shutil
    import subprocess

    import numpy as np
    from PIL import Image

    from lyra_pipeline.config import build_config
    from lyra_pipeline.report import build_report
    from tasks.evaluate import evaluate_scene
    from tasks.sdg import sample_prompts

    store_path = Path(shutil.copytree(trained_store[0], tmp_path / "store"))
    config = build_config("smoke", {"scenes": {"num_scenes": 3}})
    for scene in sample_prompts.fn(str(store_path), config):
        evaluate_scene.fn(str(store_path), config, scene, "test")
    import pyarrow as pa

    from tasks.evaluate import summarize_frames

    st = RunStore(store_path)
    st.write_summary_table("dataset", pa.Table.from_pylist(summarize_frames(st.read_tables("frames"))))
    page = build_report(str(store_path), tmp_path / "report")
    text = page.read_text()
    assert "Dataset quality" in text and "Decoder decoder-" in text and "paper" in text
    assert "http://" not in text and "https://" not in text  # nothing to fetch: opens offline
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) >= 6
    for data in images:
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), dtype=np.float32)
        assert img.std() > 5, "blank image in the report"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no headless Chromium to screenshot the report")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,2000", f"--screenshot={shot}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert img.shape[:2] == (2000, 1280) and img.std() > 20


def test_viewer_splats_skip_an_empty_cloud():
    from lyra_pipeline.viewer import viewer_splats

    empty = Gaussians(torch.zeros(0, 3), torch.ones(0, 3), torch.ones(0, 4), torch.ones(0), torch.ones(0, 3))
    assert viewer_splats(empty) is None
    g = Gaussians(torch.randn(5, 3), torch.full((5, 3), 0.1), torch.tensor([[1.0, 0, 0, 0]]).repeat(5, 1),
                  torch.full((5,), 0.5), torch.rand(5, 3))
    arrays = viewer_splats(g)
    assert arrays["centers"].shape == (5, 3) and arrays["covariances"].shape == (5, 3, 3)
    np_cov = arrays["covariances"][0]
    assert abs(float(np_cov[0, 0]) - 0.01) < 1e-6 and arrays["opacities"].shape == (5, 1)


def test_viewer_serves_scene_and_stops(trained_store, tmp_path):
    import shutil
    import socket
    import subprocess
    import urllib.request

    import numpy as np
    from PIL import Image

    pytest.importorskip("viser")
    from lyra_pipeline.viewer import start_viewer

    store_path, _ = trained_store
    scene = sorted(RunStore(store_path).scene_ids())[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_viewer(store=str(store_path), scene=scene, port=port)
    try:
        assert server.get_host() == "127.0.0.1"
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        assert "<html" in page.lower()
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium:
            shot = tmp_path / "viewer.png"
            subprocess.run([chromium, "--headless", "--no-sandbox", "--enable-unsafe-swiftshader",
                            "--use-angle=swiftshader", "--window-size=800,600", "--virtual-time-budget=10000",
                            f"--screenshot={shot}", f"http://127.0.0.1:{port}/"], capture_output=True, timeout=120)
            img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
            assert img.std() > 10, "blank viewer screenshot"
    finally:
        server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)


def test_evaluate_flow_with_a_decoder_checkpoint(trained_store, tmp_path, prefect_harness, monkeypatch):
    import hashlib
    import shutil

    from flows.evaluate_dataset import evaluate_dataset
    from lyra_pipeline.cli import quality_rich_table
    from lyra_pipeline.quality import CHEAP_METHODS
    from lyra_pipeline.report import build_report

    store_path = Path(shutil.copytree(trained_store[0], tmp_path / "store"))
    latest = json.loads(RunStore(store_path).read_file(LATEST))
    ckpt = str(store_path / latest["checkpoint"])
    over = {"scenes": {"num_scenes": 3}}
    summary = evaluate_dataset(store=str(store_path), preset="smoke", overrides=over, checkpoint=ckpt)
    dec = [r for r in summary if str(r["group"]).startswith("decoder")]
    assert len(dec) == 1 and dec[0]["scenes"] == 3 and dec[0]["frames"] == 3 * 6 * 9
    assert 0 < dec[0]["psnr_gt"] < 60
    files = sorted((store_path / "eval" / "decoder").rglob("*.parquet"))
    assert len(files) == 3
    # the decoder beside the no-learning baselines, on trajectory frames and on held-out cameras
    quality = [r for r in summary if str(r["group"]).startswith("quality")]
    assert [(r["split"], r["method"]) for r in quality] == [(s, m) for s in ("path", "held_out", "input")
                                                                   for m in CHEAP_METHODS]
    assert all(r["scenes"] == 3 and 0 < r["psnr"] < 60 for r in quality)
    # every 4th of 9 frames; 8 held-out cameras; the input camera
    assert [r["frames"] for r in quality] == [3 * 6 * 3] * 4 + [3 * 8] * 4 + [3] * 4
    sha16 = hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()[:16]
    files += sorted((store_path / "eval" / "quality").rglob("*.parquet"))
    assert len(files) == 6 and (store_path / "eval" / f"quality_{sha16}_summary.parquet").is_file()
    mtimes = [f.stat().st_mtime_ns for f in files]
    evaluate_dataset(store=str(store_path), preset="smoke", overrides=over, checkpoint=ckpt)
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # same checkpoint: no work
    assert quality_rich_table(quality).row_count == 12  # 3 splits x 4 methods
    text = build_report(str(store_path), tmp_path / "report").read_text()
    assert f"Decoder {sha16} beside no-learning baselines" in text and "held_out" in text


def test_decoder_metrics_include_lpips_with_local_weights(trained_store, tmp_path):
    import shutil

    import torch as _torch

    from tasks.train import evaluate_checkpoint_scene
    from tests.test_losses import lpips_state

    store_path = Path(shutil.copytree(trained_store[0], tmp_path / "store"))
    weights = tmp_path / "lpips_vgg.pth"
    _torch.save(lpips_state(), weights)
    ckpt = str(store_path / json.loads(RunStore(store_path).read_file(LATEST))["checkpoint"])
    scene = sorted(RunStore(store_path).scene_ids())[0]
    assert evaluate_checkpoint_scene.fn(str(store_path), ckpt, scene, 4, str(weights))["computed"]
    import hashlib

    sha16 = hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()[:16]
    rows = RunStore(store_path).read_tables(f"decoder/{sha16}").to_pylist()
    assert rows and all(r["lpips_teacher"] >= 0 and r["lpips_gt"] >= 0 for r in rows)


def test_the_html_viewer_embeds_a_widened_copy_and_the_ply_stays_as_decoded(trained_store, tmp_path, monkeypatch):
    """Per-viewer exports (issue 27): the PLY is as decoded (--smoothing 0), the Gaussians handed to the HTML
    viewer are widened by viewer_smoothing (0.2 squared input pixels), and the viewer's temporary PLY is gone."""
    from lyra_pipeline import reconstruct

    store_path, _ = trained_store
    store = RunStore(store_path)
    scene_id = sorted(store.scene_ids())[0]
    model, _ = load_decoder(store, None)
    gaussians, views, trajectories = decode_scene(model, store, scene_id)
    seen = {}

    def fake_html(ply, html_path, settings, title):
        seen["viewer"] = Gaussians.from_ply(ply)
        seen["ply"] = ply
        html_path.write_text("<html></html>")
        return html_path

    monkeypatch.setattr(reconstruct, "write_viewer_html", fake_html)
    out = tmp_path / "scene.ply"
    res = export_scene(str(store_path), scene_id, out, html=True, strip=False,
                       options=ExportOptions(backdrop="none"))
    plain = Gaussians.from_ply(res.ply)
    torch.testing.assert_close(plain.scales, gaussians.scales, rtol=1e-5, atol=1e-7)
    cam = views.get(scene_id, trajectories[0]).cameras
    d = (gaussians.means - cam.c2w[0, :3, 3]).norm(dim=-1, keepdim=True)
    widened = torch.sqrt(gaussians.scales.square() + 0.2 * (d / cam.K[0, 0, 0]).square())
    torch.testing.assert_close(seen["viewer"].scales, widened, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(seen["viewer"].means, plain.means)
    assert seen["ply"] != out and not seen["ply"].exists()
    assert not [p.name for p in tmp_path.iterdir() if "partial" in p.name]
    res = export_scene(str(store_path), scene_id, tmp_path / "same.ply", html=True, strip=False,
                       options=ExportOptions(backdrop="none", smoothing=0.2, viewer_smoothing=0.2))
    assert seen["ply"] == tmp_path / "same.ply"  # equal settings: the viewer shows the PLY itself
