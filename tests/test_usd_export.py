"""USD export of 3D Gaussian scenes (issue 28 item 3): the pure frame / quaternion / SH conversions of
``lyra_ops.usd_layout`` against simple references, and ``lyra export-ply --format usd|usdz|nurec`` read back with
usd-core and compared field by field with the PLY of the same scene (skipped without usd-core)."""

from __future__ import annotations

import gzip
import importlib.util
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import lyra_pipeline.usd_export as usd_export
from lyra_ops.errors import LyraInputError
from lyra_ops.gaussians import SH_C0, _read_binary_ply_vertices
from lyra_ops.rasterize import _quat_to_rotmat
from lyra_ops.usd_layout import (
    OPENCV_TO_Y_UP,
    OPENCV_TO_Z_UP,
    flatten_sh,
    gaussian_extent,
    quat_from_rotation,
    quat_multiply,
    quat_to_rotation,
    sh_axis_flip_signs,
    sh_from_colors,
    to_usd_frame,
    unflatten_sh,
    wxyz_to_xyzw,
    xyzw_to_wxyz,
)
from lyra_pipeline.cli import app
from tests.conftest import make_smoke_store

REPO = Path(__file__).resolve().parents[1]
HAVE_USD = importlib.util.find_spec("pxr") is not None
needs_usd = pytest.mark.skipif(not HAVE_USD, reason="usd-core not installed (pip install 'lyra-pipeline[usd]')")
SCENE = "proc-000000"
DYN_SCENE = "dyn-000000"
FLIP = np.diag([1.0, -1.0, -1.0])  # the documented frame change, written out again here


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def random_quats(n: int, seed: int = 0) -> np.ndarray:
    q = np.random.default_rng(seed).normal(size=(n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def reference_rotmat(q: np.ndarray) -> np.ndarray:
    """The renderer's own quaternion -> rotation (lyra_ops.rasterize)."""
    return _quat_to_rotmat(torch.from_numpy(np.asarray(q, dtype=np.float64))).numpy()


# ------------------------------------------------------------------------------------------------------------
# Pure conversions
# ------------------------------------------------------------------------------------------------------------


def test_quaternions_agree_with_the_renderers_rotations():
    q, p = random_quats(64, 1), random_quats(64, 2)
    R = reference_rotmat(q)
    assert np.allclose(quat_to_rotation(q), R, atol=1e-12)
    assert np.allclose(quat_to_rotation(quat_multiply(q, p)), R @ reference_rotmat(p), atol=1e-12)
    for i in range(64):  # matrix -> quaternion recovers q up to its sign, whichever component is largest
        back = quat_from_rotation(R[i])
        assert np.allclose(back, q[i] * np.sign(q[i, 0]), atol=1e-12)
    assert np.allclose(quat_from_rotation(OPENCV_TO_Y_UP), [0, 1, 0, 0])
    assert np.allclose(quat_to_rotation(quat_from_rotation(OPENCV_TO_Z_UP)), OPENCV_TO_Z_UP, atol=1e-15)
    assert np.array_equal(wxyz_to_xyzw([[1, 2, 3, 4]]), [[2, 3, 4, 1]])
    assert np.array_equal(xyzw_to_wxyz(wxyz_to_xyzw(q)), q)
    with pytest.raises(LyraInputError, match="proper 3x3 rotation"):
        quat_from_rotation(np.diag([1.0, 1.0, -1.0]))  # a mirror, not a rotation


def test_frame_change_rotates_every_gaussian_and_puts_the_floor_down():
    rng = np.random.default_rng(3)
    m = 50
    means, quats = rng.normal(size=(m, 3)), random_quats(m, 4)
    scales, opacities = rng.uniform(0.01, 0.5, size=(m, 3)), rng.uniform(0, 1, size=m)
    colors = rng.uniform(0, 1, size=(m, 3))
    out = to_usd_frame(means, quats * 3.0, scales, opacities, sh_from_colors(colors))  # unnormalised quats too
    assert np.allclose(out.positions, means @ FLIP.T)
    cov = lambda q, s: (reference_rotmat(q) * s[:, None, :] ** 2) @ reference_rotmat(q).transpose(0, 2, 1)  # noqa: E731
    assert np.allclose(cov(out.orientations, out.scales), FLIP @ cov(quats, scales) @ FLIP.T, atol=1e-12)
    assert np.allclose(np.linalg.norm(out.orientations, axis=1), 1.0)
    assert np.array_equal(out.scales, scales) and np.array_equal(out.opacities, opacities)
    assert out.sh_degree == 0 and np.allclose(out.sh[:, 0] * SH_C0 + 0.5, colors)
    # OpenCV's floor (y > 0, below the first camera) is below USD's origin (y < 0); the camera looks along -z
    floor = to_usd_frame(np.array([[0.0, 1.5, 4.0]]), np.array([[1.0, 0, 0, 0]]), np.ones((1, 3)), np.ones(1),
                         np.zeros((1, 1, 3)))
    assert floor.positions[0, 1] == -1.5 and floor.positions[0, 2] == -4.0
    with pytest.raises(LyraInputError, match="SH coefficients per Gaussian"):
        to_usd_frame(means, quats, scales, opacities, np.zeros((m, 5, 3)))
    with pytest.raises(LyraInputError, match="axis-flip rotation"):
        to_usd_frame(means, quats, scales, opacities, np.zeros((m, 4, 3)), rotation=OPENCV_TO_Z_UP)


C1 = 0.4886025119029199
C2 = [1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396]
C3 = [-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
      1.445305721320277, -0.5900435899266435]


def eval_sh(sh: np.ndarray, d: np.ndarray) -> np.ndarray:
    """3DGS's real SH evaluation (degree 3, its coefficient order): sh (16, 3), unit directions d (N, 3)."""
    x, y, z = d[:, 0:1], d[:, 1:2], d[:, 2:3]
    xx, yy, zz = x * x, y * y, z * z
    basis = [np.full_like(x, SH_C0), -C1 * y, C1 * z, -C1 * x,
             C2[0] * x * y, C2[1] * y * z, C2[2] * (2 * zz - xx - yy), C2[3] * x * z, C2[4] * (xx - yy),
             C3[0] * y * (3 * xx - yy), C3[1] * x * y * z, C3[2] * y * (4 * zz - xx - yy),
             C3[3] * z * (2 * zz - 3 * xx - 3 * yy), C3[4] * x * (4 * zz - xx - yy), C3[5] * z * (xx - yy),
             C3[6] * x * (xx - 3 * yy)]
    return sum(b * sh[k] for k, b in enumerate(basis[: len(sh)]))


@pytest.mark.parametrize("flips", [(1, -1, -1), (-1, -1, 1), (-1, 1, -1), (1, 1, 1)])
def test_sh_signs_carry_the_radiance_through_an_axis_flip(flips):
    rng = np.random.default_rng(5)
    d = rng.normal(size=(200, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    for degree in range(4):
        sh = rng.normal(size=((degree + 1) ** 2, 3))
        signs = sh_axis_flip_signs(degree, flips)
        assert np.allclose(eval_sh(sh * signs[:, None], d * np.asarray(flips)), eval_sh(sh, d), atol=1e-12)
    assert not np.all(sh_axis_flip_signs(3, (1, -1, -1)) == 1)  # the y/z-odd functions do change sign
    with pytest.raises(LyraInputError, match="product \\+1"):
        sh_axis_flip_signs(1, (1, 1, -1))


def test_sh_layout_is_each_particles_coefficients_contiguous():
    sh = np.arange(2 * 4 * 3, dtype=float).reshape(2, 4, 3)
    flat = flatten_sh(sh)
    assert flat.shape == (8, 3) and np.array_equal(flat[4], sh[1, 0]) and np.array_equal(flat[3], sh[0, 3])
    assert np.array_equal(unflatten_sh(flat, 1), sh)
    with pytest.raises(LyraInputError, match="shape \\(M \\* 4, 3\\)"):
        unflatten_sh(flat[:7], 1)


def test_extent_holds_every_three_sigma_ellipsoid_and_touches_it():
    rng = np.random.default_rng(6)
    m = 40
    means, quats, scales = rng.normal(size=(m, 3)), random_quats(m, 7), rng.uniform(0.01, 1.0, size=(m, 3))
    box = gaussian_extent(means, quats, scales)
    R = reference_rotmat(quats)
    # the point of each ellipsoid c + 3 R S u (|u| = 1) farthest along +-axis i: u = S R^T e_i / |S R^T e_i|
    for i in range(3):
        reach = 3 * np.linalg.norm(R[:, i, :] * scales, axis=1)
        assert np.isclose(box[1, i], (means[:, i] + reach).max()) and np.isclose(box[0, i], (means[:, i] - reach).min())
    u = rng.normal(size=(m, 500, 3))
    u /= np.linalg.norm(u, axis=2, keepdims=True)
    points = means[:, None, :] + 3 * np.einsum("mij,mkj->mki", R * scales[:, None, :], u)
    assert (points >= box[0] - 1e-12).all() and (points <= box[1] + 1e-12).all()
    assert np.array_equal(gaussian_extent(np.zeros((0, 3)), np.zeros((0, 4)), np.zeros((0, 3))), np.zeros((2, 3)))


@needs_usd
def test_quatf_arrays_take_numpy_as_xyzw():
    from pxr import Vt

    q = random_quats(5, 8).astype(np.float32)
    arr = Vt.QuatfArray.FromNumpy(wxyz_to_xyzw(q))
    assert np.allclose([a.GetReal() for a in arr], q[:, 0]) and np.allclose([list(a.GetImaginary()) for a in arr],
                                                                          q[:, 1:])


# ------------------------------------------------------------------------------------------------------------
# Input checks (no usd-core needed)
# ------------------------------------------------------------------------------------------------------------


def test_without_usd_core_one_line_names_the_extra_and_nothing_is_written(smoke_store_template, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setitem(sys.modules, "pxr", None)  # `import pxr` raises ImportError, as without usd-core
    importlib.reload(usd_export)  # the module itself imports without pxr (only a USD format asks for it)
    out = tmp_path / "sub" / "scene.usd"
    res = invoke("export-ply", SCENE, "--store", str(smoke_store_template), "--format", "usd", "--out", str(out))
    assert res.exit_code == 2, res.output
    assert len(lines(res.output)) == 1 and "pip install 'lyra-pipeline[usd]'" in res.output, res.output
    assert not out.parent.exists()


@pytest.mark.parametrize("args, needle", [
    (["--format", "usd", "--out", "x.usdz"], ".usd or .usda or .usdc"),
    (["--format", "nurec", "--out", "x.usd"], ".usdz for --format nurec"),
    (["--format", "obj"], "--format 'obj'"),
    (["--format", "usdz", "--html"], "--html"),
])
def test_bad_usd_options_fail_in_one_line_before_any_work(smoke_store_template, tmp_path, args, needle):
    res = invoke("export-ply", SCENE, "--store", str(smoke_store_template), *[
        str(tmp_path / a) if a.startswith("x.") else a for a in args])
    assert res.exit_code == 2 and len(lines(res.output)) == 1 and needle in res.output, res.output
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------------
# Exports read back with usd-core
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(smoke_store_template, tmp_path_factory) -> dict[str, Path]:
    """One static scene exported as PLY, .usd, .usdz and NuRec .usdz through the CLI."""
    if not HAVE_USD:
        pytest.skip("usd-core not installed")
    root = tmp_path_factory.mktemp("usd")
    paths = {"ply": root / "s.ply", "usd": root / "s.usd", "usdz": root / "s.usdz", "nurec": root / "s.nurec.usdz"}
    for fmt, path in paths.items():
        res = invoke("export-ply", SCENE, "--store", str(smoke_store_template), "--format", fmt, "--out", str(path))
        assert res.exit_code == 0, res.output
        assert lines(res.output)[-1].startswith(f"wrote {path}")
    return paths


def ply_fields(path: Path) -> dict[str, np.ndarray]:
    v = _read_binary_ply_vertices(path)
    col = lambda *names: np.stack([v[n].astype(np.float64) for n in names], axis=1)  # noqa: E731
    return {"xyz": col("x", "y", "z"), "f_dc": col("f_dc_0", "f_dc_1", "f_dc_2"),
            "opacity": v["opacity"].astype(np.float64), "scale": col("scale_0", "scale_1", "scale_2"),
            "rot": col("rot_0", "rot_1", "rot_2", "rot_3")}


def usd_fields(prim, time=None) -> dict[str, np.ndarray]:
    """The splat prim's arrays, read with plain usd-core calls (quaternions through GfQuatf's accessors)."""
    from pxr import Usd

    code = Usd.TimeCode.Default() if time is None else Usd.TimeCode(time)
    get = lambda name: prim.GetAttribute(name).Get(code)  # noqa: E731
    quats = get("orientations")
    return {"positions": np.array(get("positions"), dtype=np.float64),
            "orientations": np.array([[q.GetReal(), *q.GetImaginary()] for q in quats], dtype=np.float64),
            "scales": np.array(get("scales"), dtype=np.float64),
            "opacities": np.array(get("opacities"), dtype=np.float64),
            "sh": np.array(get("radiance:sphericalHarmonicsCoefficients"), dtype=np.float64),
            "extent": np.array(get("extent"), dtype=np.float64)}


def assert_matches_ply(usd: dict[str, np.ndarray], ply: dict[str, np.ndarray]) -> None:
    """Every field of the USD prim equals the PLY's after undoing diag(1, -1, -1) and the PLY's activations."""
    assert usd["positions"].shape == ply["xyz"].shape
    np.testing.assert_array_equal(usd["positions"] @ FLIP.T, ply["xyz"])  # a sign flip: exact in float32
    np.testing.assert_allclose(FLIP @ reference_rotmat(usd["orientations"]), reference_rotmat(ply["rot"]), atol=2e-6)
    np.testing.assert_allclose(np.log(usd["scales"] + 1e-8), ply["scale"], atol=2e-6)
    np.testing.assert_allclose(usd["opacities"], 1 / (1 + np.exp(-ply["opacity"])), atol=2e-6)
    np.testing.assert_allclose(usd["sh"], ply["f_dc"], rtol=1e-6, atol=1e-6)  # degree 0: one float3 each
    assert (usd["extent"][0] <= usd["positions"].min(axis=0)).all()
    assert (usd["extent"][1] >= usd["positions"].max(axis=0)).all()


def validation_errors(stage) -> list[str]:
    from pxr import UsdValidation

    ctx = UsdValidation.ValidationContext(UsdValidation.ValidationRegistry().GetOrLoadAllValidators())
    return [e.GetMessage() for e in ctx.Validate(stage)]


def splat_prim(path: Path):
    from pxr import Usd, UsdGeom

    stage = Usd.Stage.Open(str(path))
    assert stage and UsdGeom.GetStageUpAxis(stage) == "Y" and UsdGeom.GetStageMetersPerUnit(stage) == 1.0
    assert stage.GetDefaultPrim().GetPath() == "/World"
    prim = stage.GetPrimAtPath("/World/Gaussians")
    assert prim.GetTypeName() == "ParticleField3DGaussianSplat"
    return stage, prim


@needs_usd
@pytest.mark.parametrize("fmt", ["usd", "usdz"])
def test_usd_holds_the_plys_gaussians_field_by_field_and_validates(exports, fmt):
    stage, prim = splat_prim(exports[fmt])
    assert validation_errors(stage) == []
    assert prim.GetAttribute("radiance:sphericalHarmonicsDegree").Get() == 0  # the schema's fallback is 3
    assert prim.GetAttribute("radiance:sphericalHarmonicsCoefficients").GetMetadata("elementSize") == 1
    assert "ParticleFieldKernelGaussianEllipsoidAPI" in prim.GetAppliedSchemas()
    assert prim.GetAttribute("colorSpace:name").Get() == "srgb_rec709_scene"
    assert "diag(1, -1, -1)" in stage.GetRootLayer().customLayerData["lyra"]["frame"]
    assert_matches_ply(usd_fields(prim), ply_fields(exports["ply"]))


@needs_usd
def test_usdz_is_a_valid_package_of_the_same_stage(exports):
    with zipfile.ZipFile(exports["usdz"]) as zf:
        infos = zf.infolist()
        assert infos[0].filename.endswith(".usdc") and all(i.compress_type == zipfile.ZIP_STORED for i in infos)
    opened = [splat_prim(exports[fmt]) for fmt in ("usd", "usdz")]  # (stage, prim): the stage keeps the prim valid
    usd, usdz = (usd_fields(prim) for _, prim in opened)
    for name in usd:
        np.testing.assert_array_equal(usdz[name], usd[name])


@needs_usd
def test_nurec_usdz_carries_the_plys_gaussians_in_3dgruts_layout(exports):
    import msgpack
    from pxr import Gf, Usd, UsdGeom

    path = exports["nurec"]
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == ["default.usda", "s.nurec", "gauss.usda"]
        for info in infos:  # stored, data 64-byte aligned
            assert info.compress_type == zipfile.ZIP_STORED
            assert (info.header_offset + 30 + len(info.filename) + len(info.extra)) % 64 == 0
        model = msgpack.unpackb(gzip.GzipFile(fileobj=io.BytesIO(zf.read("s.nurec"))).read())["nre_data"]
    stage = Usd.Stage.Open(str(path))
    assert UsdGeom.GetStageUpAxis(stage) == "Z" and UsdGeom.GetStageMetersPerUnit(stage) == 1.0
    volume = stage.GetPrimAtPath("/World/gauss/gauss")
    assert volume.GetTypeName() == "Volume" and volume.GetAttribute("omni:nurec:isNuRecVolume").Get() is True
    for rel, child in (("field:density", "density_field"), ("field:emissiveColor", "emissive_color_field")):
        assert volume.GetRelationship(rel).GetTargets() == [volume.GetPath().AppendChild(child)]
        asset = stage.GetPrimAtPath(volume.GetPath().AppendChild(child))
        assert asset.GetTypeName() == "OmniNuRecFieldAsset"
        assert asset.GetAttribute("filePath").Get().resolvedPath.endswith("[s.nurec]")
    # the transform stands Lyra's OpenCV world up in Z-up: down (0, 1, 0) -> (0, 0, -1), forward -> +y
    to_world = UsdGeom.Xformable(volume).ComputeLocalToWorldTransform(Usd.TimeCode.Default())
    assert to_world.Transform(Gf.Vec3d(0, 1, 0)) == Gf.Vec3d(0, 0, -1)
    assert to_world.Transform(Gf.Vec3d(0, 0, 1)) == Gf.Vec3d(0, 1, 0)
    # the only validator complaint is the payload's extension, which the format needs
    assert all("unknown unsupported extension 'nurec'" in e for e in validation_errors(stage))

    state, ply = model["state_dict"], ply_fields(exports["ply"])
    m = len(ply["xyz"])

    def tensor(name: str) -> np.ndarray:
        key = ".gaussians_nodes.gaussians." + name
        return np.frombuffer(state[key], dtype="<f2").astype(np.float64).reshape(state[key + ".shape"])

    half = dict(rtol=1e-3, atol=1e-3)  # float16
    np.testing.assert_allclose(tensor("positions"), ply["xyz"], **half)
    np.testing.assert_allclose(tensor("rotations"), ply["rot"], **half)
    np.testing.assert_allclose(tensor("scales"), ply["scale"], rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(tensor("densities")[:, 0], ply["opacity"], rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(tensor("features_albedo"), ply["f_dc"], **half)
    assert tensor("features_specular").shape == (m, 45) and not tensor("features_specular").any()
    assert tensor("extra_signal").shape == (m, 0)
    assert np.frombuffer(state[".gaussians_nodes.gaussians.n_active_features"], dtype="<i8").tolist() == [3]
    layer = model["config"]["layers"]["gaussians"]
    assert (layer["density_activation"], layer["scale_activation"], layer["particle"]["radiance_sph_degree"]) == (
        "sigmoid", "exp", 3)


@pytest.fixture(scope="module")
def dyn_store(tmp_path_factory) -> Path:
    if not HAVE_USD:
        pytest.skip("usd-core not installed")
    return make_smoke_store(tmp_path_factory.mktemp("usd-dyn") / "store", num_scenes=1, preset="dynamic-smoke")


@needs_usd
def test_dynamic_scene_is_one_stage_sampled_at_each_exported_frame(dyn_store, tmp_path):
    ply, usd = tmp_path / "seq.ply", tmp_path / "seq.usda"
    for fmt, path in (("ply", ply), ("usd", usd)):
        res = invoke("export-ply", DYN_SCENE, "--store", str(dyn_store), "--times", "0,4,8", "--format", fmt,
                     "--out", str(path))
        assert res.exit_code == 0, res.output
    assert "3 time samples (frames 0..8)" in lines(res.output)[-1]
    stage, prim = splat_prim(usd)
    assert validation_errors(stage) == []
    assert prim.GetAttribute("positions").GetTimeSamples() == [0.0, 4.0, 8.0]
    assert (stage.GetStartTimeCode(), stage.GetEndTimeCode(), stage.GetTimeCodesPerSecond()) == (0.0, 8.0, 8.0)
    counts = []
    for frame in (0, 4, 8):
        fields = usd_fields(prim, frame)
        assert_matches_ply(fields, ply_fields(tmp_path / f"seq_{frame:04d}.ply"))
        counts.append(len(fields["positions"]))
    first, last = usd_fields(prim, 0)["positions"], usd_fields(prim, 8)["positions"]
    assert len(set(counts)) > 1 or not np.array_equal(first, last)  # the samples differ: the scene moves
    # NuRec holds one static set: a sequence is refused in one line, nothing written
    res = invoke("export-ply", DYN_SCENE, "--store", str(dyn_store), "--times", "0,4", "--format", "nurec",
                 "--out", str(tmp_path / "n" / "x.usdz"))
    assert res.exit_code == 2 and len(lines(res.output)) == 1 and "one static Gaussian set" in res.output
    assert not (tmp_path / "n").exists()
