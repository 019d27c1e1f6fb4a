"""lyra_pipeline.quality: the decoder-quality table (decoder beside no-learning baselines) on a smoke store."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pytest

import lyra_ops.decoder
from lyra_ops.decoder import DecoderConfig, LatentGaussianDecoder
from lyra_ops.errors import LyraConfigError
from lyra_pipeline.quality import (
    CHEAP_METHODS,
    QUALITY_SCHEMA,
    QualitySettings,
    available_methods,
    check_methods,
    quality_table,
    scene_quality_rows,
    summarize_quality,
)
from lyra_pipeline.storage import RunStore

REPO = Path(__file__).resolve().parents[1]
SETTINGS = QualitySettings(path_stride=4, held_out_views=3, optimize_init_points=2000)


@pytest.fixture
def ceiling():
    """The real lyra_ops.decoder.ceiling_gaussians (kept as a fixture name for the tests that ask for it)."""


@pytest.fixture(scope="module")
def tiny_decoder() -> LatentGaussianDecoder:
    return LatentGaussianDecoder(DecoderConfig.preset("tiny", far=20.0)).eval()


def test_scene_rows_of_every_method_on_both_splits(smoke_store_template, tiny_decoder, ceiling):
    store = RunStore(smoke_store_template, create=False)
    scene = store.scene_ids()[0]
    methods = [*CHEAP_METHODS, "optimized_2", "optimized_4"]
    rows = scene_quality_rows(store, scene, tiny_decoder, methods=methods, settings=SETTINGS)
    pa.Table.from_pylist(rows, schema=QUALITY_SCHEMA)  # every row fits the stored schema
    by = defaultdict(list)
    for r in rows:
        by[(r["split"], r["method"])].append(r)
    path_views = 6 * len(range(0, 9, 4))  # 6 trajectories x frames 0, 4, 8
    for m in methods:
        assert len(by[("path", m)]) == path_views and len(by[("held_out", m)]) == 3 and len(by[("input", m)]) == 1
    # the plane's AbsRel is a property of the view, the same for every method; the flat method's depth is that plane
    plane = defaultdict(set)
    for r in rows:
        plane[(r["split"], r["trajectory"], r["frame"])].add(r["plane_depth_absrel"])
    assert all(len(v) == 1 and math.isfinite(next(iter(v))) for v in plane.values())
    for r in by[("path", "flat")] + by[("held_out", "flat")]:
        assert r["depth_absrel"] == pytest.approx(r["plane_depth_absrel"])
    # the input view: the unprojected input frame renders it back, far above its mean colour, with exact depth
    first = {m: next(r for r in by[("path", m)] if r["frame"] == 0) for m in methods}
    assert first["rgbd"]["psnr"] > first["flat"]["psnr"] + 5 and first["rgbd"]["depth_absrel"] < 0.02
    assert first["ceiling"]["gaussians"] == first["decoder"]["gaussians"]  # the decoder's grid (stub or real)
    # path frames score against the teacher too, held-out views never; every view on the pixels the input saw
    # and on the others: at the input camera every pixel is seen, and the RGB-D unprojection renders it back
    assert all(math.isfinite(r["psnr_teacher"]) for r in by[("path", "decoder")])
    for r in by[("held_out", "decoder")] + by[("path", "decoder")]:
        assert math.isfinite(r["psnr_seen"]) and 0 < r["seen_fraction"] <= 1
    assert all(math.isnan(r["psnr_teacher"]) for r in by[("held_out", "decoder")])
    assert any(math.isfinite(r["psnr_unseen"]) and r["seen_fraction"] < 1 for r in by[("held_out", "decoder")])
    at_input = {m: by[("input", m)][0] for m in methods}
    assert at_input["rgbd"]["seen_fraction"] > 0.98
    assert at_input["rgbd"]["psnr_seen"] > at_input["flat"]["psnr_seen"] + 5
    assert at_input["rgbd"]["psnr"] == pytest.approx(first["rgbd"]["psnr"])  # frame 0 of every path is the input
    # both optimisation snapshots come from one run: the later one has taken longer
    assert by[("path", "optimized_4")][0]["build_seconds"] > by[("path", "optimized_2")][0]["build_seconds"] > 0
    assert by[("path", "decoder")][0]["gaussians"] > 0
    # held-out cameras are seeded by scene: a second run scores the same views the same way
    again = scene_quality_rows(store, scene, None, methods=["flat"], settings=SETTINGS)
    assert [r["psnr"] for r in again] == [r["psnr"] for r in rows if r["method"] == "flat"]
    # summary: the documented keys, spread over scenes, no LPIPS without a module
    summary = summarize_quality(rows)
    for split in ("path", "held_out"):
        block = summary[split]
        assert block["scenes"] == 1 and block["frames"] == (path_views if split == "path" else 3)
        for key in ("flat_psnr", "flat_ssim", "rgbd_psnr", "ceiling_psnr", "decoder_psnr", "decoder_ssim",
                    "decoder_depth_absrel", "plane_depth_absrel", "optimized_4_psnr", "rgbd_depth_absrel"):
            assert math.isfinite(block[key]), (split, key)
        assert not any("lpips" in k for k in block)
    assert all(math.isfinite(summary[split]["decoder_psnr_seen"]) for split in ("path", "held_out", "input"))
    assert set(summary["path_per_trajectory"]) == {r["trajectory"] for r in by[("path", "flat")]}
    table = quality_table(rows)
    assert [(t["split"], t["method"]) for t in table][:3] == [("path", "flat"), ("path", "rgbd"), ("path", "ceiling")]
    assert len(table) == 3 * len(methods)


def test_summary_is_mean_and_spread_over_scenes():
    def row(scene: str, frame: int, psnr: float) -> dict:
        base = dict.fromkeys(("ssim", "lpips", "psnr_seen", "psnr_unseen", "psnr_teacher", "ssim_teacher",
                              "lpips_teacher", "depth_absrel", "seen_fraction"), math.nan)
        return {**base, "scene_id": scene, "split": "path", "trajectory": "left", "frame": frame, "method": "flat",
                "psnr": psnr, "plane_depth_absrel": 0.5, "gaussians": 0, "build_seconds": 1.0, "render_seconds": 2.0}

    # scene a: frames 10 and 20 dB (mean 15); scene b: 25 dB; an infinite PSNR is left out of the mean
    rows = [row("a", 0, 10.0), row("a", 1, 20.0), row("b", 0, 25.0), row("b", 1, math.inf)]
    block = summarize_quality(rows)["path"]
    assert block["scenes"] == 2 and block["frames"] == 4
    assert block["flat_psnr"] == 20.0 and block["flat_psnr_min"] == 15.0 and block["flat_psnr_max"] == 25.0
    assert block["flat_psnr_std"] == pytest.approx(math.sqrt(50.0))  # sample std of (15, 25)
    assert block["plane_depth_absrel"] == 0.5 and block["flat_build_seconds"] == 1.0
    assert "flat_ssim" not in block  # NaN everywhere: left out


def test_method_names_are_checked_and_ceiling_waits_for_the_decoder(monkeypatch):
    assert check_methods(["decoder", "optimized_1000", "flat", "optimized_300"]) == [
        "flat", "optimized_300", "optimized_1000", "decoder"]
    with pytest.raises(LyraConfigError, match="unknown quality methods"):
        check_methods(["flat", "optimised"])
    monkeypatch.delattr(lyra_ops.decoder, "ceiling_gaussians", raising=False)
    assert available_methods(["ceiling", "flat"]) == ["flat"]


def test_quality_columns_are_documented():
    doc = (REPO / "storage_layout.md").read_text()
    for name in QUALITY_SCHEMA.names:
        assert f"| `{name}` |" in doc, f"quality column {name} not documented in storage_layout.md"
    assert "eval/quality/<sha16>/<scene_id>.parquet" in doc and "eval/quality_<sha16>_summary.parquet" in doc



def test_quality_background_error_names_the_field():
    with pytest.raises(LyraConfigError, match=r"QualitySettings\.background must be one of white, input_mean"):
        QualitySettings(background="grey")


def test_rgbd_known_unprojects_the_depth_the_decoder_is_given(smoke_store_template, tiny_decoder):
    """``rgbd_known``: the input frame on its known depth (edges filled as the decoder fills them), one Gaussian per
    pixel whose filled depth is known, beside ``rgbd`` on the exact depth at every pixel."""
    from lyra_ops.depth import fill_from_neighbours
    from lyra_pipeline.training import ViewCache, index_dataset

    store = RunStore(smoke_store_template, create=False)
    scene = store.scene_ids()[0]
    rows = scene_quality_rows(store, scene, tiny_decoder, methods=["rgbd", "rgbd_known"], settings=SETTINGS)
    at_input = {r["method"]: r for r in rows if r["split"] == "input"}
    known = ViewCache(store).get(scene, index_dataset(store).scenes[scene][0]).known_depth[0, 0]
    filled = fill_from_neighbours(known.float(), tiny_decoder.config.input_depth_fill)
    assert bool((known <= 0).any())  # the reliability filter left depth edges unknown
    assert at_input["rgbd_known"]["gaussians"] == int((filled > 0).sum())
    assert at_input["rgbd"]["gaussians"] == known.numel()
    assert at_input["rgbd_known"]["psnr"] > 20 and at_input["rgbd"]["psnr"] > 20
