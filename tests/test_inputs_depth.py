import numpy as np
import pytest
import torch
from PIL import Image

from lyra_ops.cameras import default_intrinsics
from lyra_ops.depth import ConstantDepth, PlanarDepth, align_depth_scale, check_user_depth, postprocess_depth
from lyra_ops.errors import LyraInputError
from lyra_ops.generation import WarpOnlyGenerator, push_pull_fill
from lyra_ops.images import cover_crop_resize, from_uint8, to_uint8
from lyra_ops.prompts import SceneRecord, sample_records
from lyra_ops.trajectories import make_trajectory
from lyra_pipeline.inputs import load_depth_file, load_image, scan_image_folder


def test_postprocess_depth_follows_spec():
    d = torch.tensor([[1.0, float("nan"), -2.0], [float("inf"), 500.0, 3.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    out = postprocess_depth(d, valid, max_depth=100.0)
    assert out.tolist() == [[1.0, 100.0, 0.0], [100.0, 100.0, 100.0]]


def test_user_depth_rejects_nan_and_negative(tmp_path):
    d = np.ones((8, 8), np.float32)
    d[2, 3] = -1.0
    d[5, 5] = np.nan
    np.save(tmp_path / "scene.depth.npy", d)
    with pytest.raises(LyraInputError, match=r"scene\.depth\.npy.*1 NaN/Inf and 1 zero/negative.*row 2, col 3"):
        load_depth_file(tmp_path / "scene.depth.npy", 8, 8)
    with pytest.raises(LyraInputError, match=r"2-D"):
        check_user_depth(torch.ones(2, 2, 2), source="x")
    (tmp_path / "bad.depth.npy").write_bytes(b"not numpy")
    with pytest.raises(LyraInputError, match=r"bad\.depth\.npy.*cannot read"):
        load_depth_file(tmp_path / "bad.depth.npy", 8, 8)


def test_fallback_estimators_are_labelled_and_positive():
    img = torch.rand(3, 32, 48)
    K = default_intrinsics(32, 48)
    for est in (ConstantDepth(2.0), PlanarDepth(2.0)):
        pred = est.estimate(img, K)
        assert pred.depth.shape == (32, 48) and bool((pred.depth > 0).all())
        assert "no depth model" in pred.label
    planar = PlanarDepth(2.0).estimate(img, K).depth
    assert planar[-1, 0] < planar[20, 0] <= planar[0, 0]  # ground gets closer toward the bottom


def test_image_loading_and_errors(tmp_path, examples_dir):
    img = load_image(examples_dir / "samples" / "00.png", 88, 160)  # RGBA 1280x714 -> RGB cover crop
    assert img.shape == (3, 88, 160) and 0 <= float(img.min()) and float(img.max()) <= 1
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(LyraInputError, match=r"broken\.png: cannot decode image"):
        load_image(tmp_path / "broken.png", 88, 160)
    with pytest.raises(LyraInputError, match=r"missing\.png: image file not found"):
        load_image(tmp_path / "missing.png", 88, 160)


def test_scan_image_folder(tmp_path, examples_dir):
    recs = scan_image_folder(examples_dir / "samples", run_seed=0)
    assert [r.scene_id for r in recs] == ["00", "02", "04", "06", "08", "10", "12", "14"]
    assert "’" in next(r.text for r in recs if r.scene_id == "04")  # UTF-8 prompt read intact
    Image.new("RGB", (16, 16)).save(tmp_path / "a..b.png")
    with pytest.raises(LyraInputError, match=r"a\.\.b\.png: invalid scene id"):
        scan_image_folder(tmp_path, 0)
    with pytest.raises(LyraInputError, match="images folder not found"):
        scan_image_folder(tmp_path / "does_not_exist", 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LyraInputError, match="no images found"):
        scan_image_folder(tmp_path / "empty", 0)


def test_sampling_is_order_independent():
    recs = [SceneRecord(f"s{i}", "", None, str(i), i, "images") for i in range(20)]
    a = sample_records(recs, 5, run_seed=3)
    b = sample_records(list(reversed(recs)), 5, run_seed=3)
    assert a == b and len(a) == 5
    assert sample_records(recs, 5, run_seed=4) != a


def test_cover_crop_and_uint8_round_trip():
    img = torch.rand(3, 50, 100)
    out = cover_crop_resize(img, 40, 40)
    assert out.shape == (3, 40, 40)
    q = to_uint8(img)
    assert torch.allclose(from_uint8(q), img, atol=0.5 / 255 + 1e-6)


def test_push_pull_fill_and_warp_only():
    img = torch.rand(1, 3, 16, 16)
    mask = torch.rand(1, 1, 16, 16) > 0.5
    filled = push_pull_fill(img, mask.expand_as(img))
    assert torch.equal(filled[mask.expand_as(img)], img[mask.expand_as(img)])
    assert bool(torch.isfinite(filled).all())
    const = torch.full((1, 3, 8, 8), 0.25)
    m = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    m[..., 2, 3] = True
    assert torch.allclose(push_pull_fill(const, m.expand_as(const)), const)
    K = default_intrinsics(16, 16)
    cams = make_trajectory("left", K, 16, 16, 3, distance=0.2)
    out = WarpOnlyGenerator().generate(torch.rand(3, 16, 16), "", cams, img.expand(3, 3, 16, 16) * 2 - 1,
                                       mask.expand(3, 1, 16, 16), seed=0)
    assert out.shape == (3, 3, 16, 16)


def test_align_depth_scale_matches_the_reference_by_median_ratio():
    gen = torch.Generator().manual_seed(0)
    reference = torch.rand(24, 32, generator=gen) * 4 + 1
    valid = torch.rand(24, 32, generator=gen) > 0.3
    relative = reference / 2.5  # a monocular estimate off by a global scale
    relative[0, :8] = 50.0  # a few outliers the median ignores
    aligned, factor = align_depth_scale(relative, torch.where(valid, reference, 0.0), valid)
    assert factor == pytest.approx(2.5, rel=1e-5)
    torch.testing.assert_close(aligned[1:], reference[1:])
    # too few reference pixels: left as it is
    few = torch.zeros_like(valid)
    few[0, :3] = True
    same, one = align_depth_scale(relative, reference, few)
    assert one == 1.0 and same is relative
    with pytest.raises(LyraInputError, match="align_depth_scale"):
        align_depth_scale(relative, reference[:4], valid)


def test_teacher_frame_depth_backends():
    from lyra_ops.scenes import make_scene
    from lyra_pipeline.config import build_config
    from tasks.sdg import teacher_frame_depth

    h, w, t = 32, 48, 5
    cams = make_trajectory("left", default_intrinsics(h, w), h, w, t, distance=0.2)
    record = SceneRecord(scene_id="proc-000000", text="", image_path=None, content_sha="", seed=7, source="procedural")
    warped = torch.full((t, 1, h, w), 2.0)
    valid = torch.zeros(t, 1, h, w, dtype=torch.bool)
    valid[:, :, :, : w // 2] = True
    exact_cfg = build_config("smoke", {})
    depth, label = teacher_frame_depth(exact_cfg, record, torch.zeros(t, 3, h, w), cams, warped, valid)
    expected = make_scene(7, kind=exact_cfg.scenes.scene_kind).render(cams.c2w, cams.K, h, w).depth
    torch.testing.assert_close(depth, expected.float())
    assert label == "procedural (exact)" and depth.shape == (t, 1, h, w)
    planar_cfg = build_config("smoke", {"depth": {"backend": "planar"}})
    depth, label = teacher_frame_depth(planar_cfg, record, torch.zeros(t, 3, h, w), cams, warped, valid)
    torch.testing.assert_close(depth, torch.where(valid, 2.0, 0.0))
    assert "warped input depth" in label
