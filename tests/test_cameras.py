import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lyra_ops.cameras import Cameras, check_se3, default_intrinsics, invert_se3
from lyra_ops.errors import LyraInputError
from lyra_ops.seeding import numpy_rng
from lyra_ops.trajectories import LYRA_PATHS, draw_distance, load_trajectory, make_trajectory

H, W = 88, 160
K = default_intrinsics(H, W)


def random_rotation(a, b, c):
    q = torch.tensor([1.0, a, b, c], dtype=torch.float64)
    q = q / q.norm()
    w, x, y, z = q
    return torch.tensor([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                         [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                         [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


@given(st.floats(-3, 3), st.floats(-3, 3), st.floats(-3, 3), st.lists(st.floats(-10, 10), min_size=3, max_size=3))
@settings(max_examples=50, deadline=None)
def test_invert_se3_round_trip(a, b, c, t):
    m = torch.eye(4, dtype=torch.float64)
    m[:3, :3] = random_rotation(a, b, c)
    m[:3, 3] = torch.tensor(t, dtype=torch.float64)
    inv = invert_se3(m[None])[0]
    assert torch.allclose(inv @ m, torch.eye(4, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(inv, torch.linalg.inv(m), atol=1e-10)


def test_camera_conversions():
    cams = make_trajectory("clockwise", K, H, W, 9, distance=0.5)
    assert torch.allclose(cams.w2c @ cams.c2w, torch.eye(4).expand(9, 4, 4), atol=1e-5)
    back = Cameras.from_opengl(cams.to_opengl(), cams.K, H, W)
    assert torch.allclose(back.c2w, cams.c2w)
    assert torch.allclose(Cameras.from_w2c(cams.w2c, cams.K, H, W).c2w, cams.c2w, atol=1e-6)
    n = cams.normalized_intrinsics()
    assert torch.allclose(n[:, 0, 2], torch.full((9,), 0.5)) and torch.allclose(n[:, 1, 2], torch.full((9,), 0.5))
    assert cams.fxfycxcy.shape == (9, 4)
    half = cams.resized(H // 2, W // 2)
    assert torch.allclose(half.K[:, 0, 0], cams.K[:, 0, 0] / 2)
    assert len(cams[2:5]) == 3 and len(cams[0]) == 1


@pytest.mark.parametrize("name", list(LYRA_PATHS))
def test_paths_start_at_identity_and_look_at_target(name):
    cams = make_trajectory(name, K, H, W, 25, distance=0.3, center_depth=1.5)
    assert torch.allclose(cams.c2w[0], torch.eye(4), atol=1e-6)
    check_se3(cams.c2w)
    # the look-at target projects to the principal point in every frame
    target = torch.tensor([0.0, 0.0, 1.5, 1.0])
    cam_pts = (cams.w2c @ target)[:, :3]
    uv = (cams.K @ cam_pts[..., None])[..., 0]
    uv = uv[:, :2] / uv[:, 2:]
    assert torch.allclose(uv, torch.tensor([W / 2, H / 2]).expand(25, 2), atol=1e-3)


def test_linear_parametrisation_matches_spec():
    n, d, c = 121, 0.25, 1.0
    left = make_trajectory("left", K, H, W, n, distance=d, center_depth=c)
    assert torch.allclose(left.centers[-1].double(), torch.tensor([-d * c * (n - 1) / n, 0, 0]).double(), atol=1e-6)
    zoom = make_trajectory("zoom_in", K, H, W, n, distance=0.35)
    assert zoom.centers[-1, 2] == pytest.approx(0.35 * 120 / 121, abs=1e-6)
    up = make_trajectory("up", K, H, W, n, distance=0.15)
    assert up.centers[-1, 1] == pytest.approx(-0.15 * 120 / 121, abs=1e-6)  # y down: up is negative


def test_lyra_lookat_quirk_reproduced():
    # spec 1.5: a left move of nominal 0.2479 ends at (-0.2406, 0, 0.0597) with Lyra's -p translation
    cams = make_trajectory("left", K, H, W, 121, distance=0.25, lookat="lyra")
    assert torch.allclose(cams.centers[-1], torch.tensor([-0.2406, 0.0, 0.0597]), atol=2e-4)


def test_spiral_closes_and_has_spec_radii():
    cams = make_trajectory("clockwise", K, H, W, 121, distance=0.5)
    c = cams.centers.double()
    assert torch.allclose(c[-1], torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert c[:, 0].min() == pytest.approx(-2 * 0.5 * 0.15, abs=1e-3)
    assert c[:, 1].abs().max() == pytest.approx(0.5 * 0.10, abs=1e-3)
    ccw = make_trajectory("counterclockwise", K, H, W, 121, distance=0.5)
    assert ccw.centers[:, 0].max() == pytest.approx(2 * 0.5 * 0.15, abs=1e-3)


def test_distances_seeded_and_in_range():
    for name, spec in LYRA_PATHS.items():
        d1 = draw_distance(spec, numpy_rng(7, "scene", name))
        d2 = draw_distance(spec, numpy_rng(7, "scene", name))
        assert d1 == d2 and spec.distance_range[0] <= d1 <= spec.distance_range[1]


def test_custom_npz_example(examples_dir):
    path = examples_dir / "custom_trajectory_examples" / "example_0" / "trajectory.npz"
    cams = load_trajectory(path, height=352, width=640, num_frames=121)
    assert len(cams) == 121 and cams.height == 352
    raw = np.load(path)
    assert cams.K[0, 0, 0].item() == pytest.approx(raw["intrinsics"][0, 0, 0] * 640 / 1280, rel=1e-5)
    assert cams.K[0, 1, 2].item() == pytest.approx(raw["intrinsics"][0, 1, 2] * 352 / 720, rel=1e-5)
    assert torch.allclose(cams.c2w[0], torch.eye(4), atol=1e-6)
    expected = np.linalg.inv(raw["w2c"][120].astype(np.float64))[:3, 3]
    rel0 = raw["w2c"][0].astype(np.float64)
    expected = (rel0 @ np.append(expected, 1.0))[:3]  # re-expressed in frame 0's camera
    assert np.allclose(cams.centers[120].numpy(), expected, atol=1e-4)


def _save_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_custom_npz_errors_name_file_field_and_frame(tmp_path):
    w2c = np.tile(np.eye(4, dtype=np.float32), (5, 1, 1))
    k = np.tile(np.asarray(K), (5, 1, 1))
    p = _save_npz(tmp_path / "wrong_shape.npz", w2c=w2c[:, :3, :], intrinsics=k)
    with pytest.raises(LyraInputError, match=r"wrong_shape\.npz.*'w2c'.*\(N, 4, 4\)"):
        load_trajectory(p, height=H, width=W)
    p = _save_npz(tmp_path / "missing.npz", w2c=w2c)
    with pytest.raises(LyraInputError, match=r"missing\.npz.*missing key 'intrinsics'"):
        load_trajectory(p, height=H, width=W)
    bad = w2c.copy()
    bad[3, :3, :3] *= 2.0  # scaled rotation: not SE(3)
    p = _save_npz(tmp_path / "scaled.npz", w2c=bad, intrinsics=k)
    with pytest.raises(LyraInputError, match=r"scaled\.npz.*w2c\[3\].*SE\(3\)"):
        load_trajectory(p, height=H, width=W)
    nan = w2c.copy()
    nan[2, 0, 3] = np.nan
    p = _save_npz(tmp_path / "nan.npz", w2c=nan, intrinsics=k)
    with pytest.raises(LyraInputError, match=r"nan\.npz.*w2c\[2\].*NaN"):
        load_trajectory(p, height=H, width=W)
    p = _save_npz(tmp_path / "short.npz", w2c=w2c, intrinsics=k)
    with pytest.raises(LyraInputError, match=r"short\.npz.*5 frames but 9"):
        load_trajectory(p, height=H, width=W, num_frames=9)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(LyraInputError, match=r"x\.txt.*\.npz or \.json"):
        load_trajectory(tmp_path / "x.txt", height=H, width=W)


def test_custom_json_and_opengl_equivalence(tmp_path):
    cams = make_trajectory("right", K, H, W, 5, distance=0.3)
    frames_cv = [{"c2w": c.tolist(), "K": K.tolist()} for c in cams.c2w]
    frames_gl = [{"c2w": c.tolist(), "fx": float(K[0, 0]), "fy": float(K[1, 1]), "cx": float(K[0, 2]),
                  "cy": float(K[1, 2])} for c in cams.to_opengl()]
    (tmp_path / "cv.json").write_text(json.dumps({"frames": frames_cv, "image_height": H, "image_width": W}))
    (tmp_path / "gl.json").write_text(json.dumps({"convention": "opengl", "frames": frames_gl}))
    a = load_trajectory(tmp_path / "cv.json", height=H, width=W)
    b = load_trajectory(tmp_path / "gl.json", height=H, width=W)
    assert torch.allclose(a.c2w, cams.c2w, atol=1e-5) and torch.allclose(b.c2w, cams.c2w, atol=1e-5)
    frames_cv[2]["c2w"][0][0] = 3.0
    (tmp_path / "bad.json").write_text(json.dumps({"frames": frames_cv}))
    with pytest.raises(LyraInputError, match=r"bad\.json.*frames\[2\]\.c2w.*SE\(3\)"):
        load_trajectory(tmp_path / "bad.json", height=H, width=W)
    (tmp_path / "nok.json").write_text(json.dumps({"frames": [{"c2w": np.eye(4).tolist()}]}))
    with pytest.raises(LyraInputError, match=r"nok\.json.*frames\[0\] needs 'K'"):
        load_trajectory(tmp_path / "nok.json", height=H, width=W)


def test_custom_json_unknown_keys_name_the_nearest(tmp_path):
    """Misspelt keys used to be ignored ("image_heigth" silently gave the video's height, "convension" OpenCV)."""
    frames = [{"c2w": np.eye(4).tolist(), "K": K.tolist()}]
    for doc, message in (
        ({"frames": frames, "image_heigth": 720},
         r"t\.json: unknown key 'image_heigth' \(did you mean 'image_height'\?\)"),
        ({"frames": frames, "convension": "opengl"}, r"unknown key 'convension' \(did you mean 'convention'\?\)"),
        ({"frames": [{**frames[0], "fxx": 3.0}]}, r"frames\[0\]: unknown key 'fxx' \(did you mean 'fx'\?\)"),
    ):
        (tmp_path / "t.json").write_text(json.dumps(doc))
        with pytest.raises(LyraInputError, match=message):
            load_trajectory(tmp_path / "t.json", height=H, width=W)


def test_cameras_validation_messages():
    with pytest.raises(LyraInputError, match=r"K must have shape \(N, 3, 3\)"):
        Cameras(torch.eye(4)[None], torch.eye(3), H, W)
    with pytest.raises(LyraInputError, match="positive focal"):
        Cameras(torch.eye(4)[None], torch.zeros(1, 3, 3), H, W)
    with pytest.raises(LyraInputError, match="height and width"):
        Cameras(torch.eye(4)[None], K[None], 0, W)
