"""Gaussians container: validation, utilities, Lyra pruning, PLY round trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lyra_ops.errors import LyraInputError
from lyra_ops.gaussians import SH_C0, Gaussians
from lyra_ops.rasterize import rasterize

FIELDS = ("means", "scales", "quats", "opacities", "colors")


def random_gaussians(n: int = 50, seed: int = 0) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=gen) * 0.5 + torch.tensor([0.0, 0.0, 4.0])
    return Gaussians(
        means=means,
        scales=torch.rand(n, 3, generator=gen) * 0.2 + 0.01,
        quats=torch.randn(n, 4, generator=gen),
        opacities=torch.rand(n, generator=gen),
        colors=torch.rand(n, 3, generator=gen),
    )


def fields(g: Gaussians) -> dict[str, torch.Tensor]:
    return {f: getattr(g, f) for f in FIELDS}


# ---------------------------------------------------------------------------------------------------------
# Construction and validation
# ---------------------------------------------------------------------------------------------------------


def test_quaternions_are_normalised_and_gradients_reach_the_raw_ones():
    raw = torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    g = Gaussians(torch.zeros(2, 3), torch.ones(2, 3), raw, torch.ones(2), torch.zeros(2, 3))
    assert torch.allclose(g.quats.norm(dim=1), torch.ones(2))
    assert torch.allclose(g.quats[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    g.quats[1, 0].backward()
    assert raw.grad is not None and torch.isfinite(raw.grad).all() and float(raw.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"means": torch.zeros(4, 2)}, r"means must have shape \(M, 3\), got \(4, 2\)"),
        ({"scales": torch.ones(3, 3)}, r"scales must have shape \(M, 3\) = \(4, 3\) to match means, got \(3, 3\)"),
        ({"opacities": torch.ones(4, 1)}, r"opacities must have shape \(M,\) = \(4,\), got \(4, 1\) \(squeeze"),
        ({"colors": torch.ones(4, 4)}, r"colors must have shape \(M, 3\)"),
        ({"means": torch.full((4, 3), float("nan"))}, r"means\[0\] contains NaN or Inf"),
        ({"scales": -torch.ones(4, 3)}, r"scales must be linear \(>= 0\).*log-scales"),
        ({"opacities": torch.full((4,), 2.0)}, r"opacities must be activated values in \[0, 1\].*logits"),
        ({"quats": torch.zeros(4, 4)}, r"quats\[0\].*zero norm"),
        ({"colors": torch.ones(4, 3, dtype=torch.float64)}, "share one dtype and device"),
        ({"colors": torch.ones(4, 3, dtype=torch.int64)}, "floating-point"),
        ({"means": [[0.0, 0.0, 0.0]]}, "must be a torch.Tensor"),
    ],
)
def test_validation_errors_teach(change, message):
    base = {
        "means": torch.zeros(4, 3),
        "scales": torch.ones(4, 3),
        "quats": torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(4, 1),
        "opacities": torch.ones(4),
        "colors": torch.zeros(4, 3),
    }
    with pytest.raises(LyraInputError, match=message):
        Gaussians(**{**base, **change})


def test_empty_set_is_valid():
    g = Gaussians(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 3))
    assert g.num == 0


# ---------------------------------------------------------------------------------------------------------
# Utilities and pruning
# ---------------------------------------------------------------------------------------------------------


def test_num_to_detach_cat_index():
    a, b = random_gaussians(10, seed=1), random_gaussians(7, seed=2)
    both = Gaussians.cat([a, b])
    assert both.num == 17 and a.num == 10
    assert torch.equal(both.means[10:], b.means)
    double = both.to(dtype=torch.float64)
    assert double.dtype == torch.float64 and double.means.dtype == torch.float64
    assert double.to("cpu", torch.float32).device.type == "cpu"
    leaf = a.means.clone().requires_grad_(True)
    attached = Gaussians(leaf, a.scales, a.quats, a.opacities, a.colors)
    assert attached.means.requires_grad and not attached.detach().means.requires_grad
    assert attached.index(torch.tensor([1, 3])).num == 2
    with pytest.raises(LyraInputError, match="at least one"):
        Gaussians.cat([])


def test_prune_by_opacity_keeps_the_most_opaque_floor_fraction():
    g = random_gaussians(53, seed=3)
    kept = g.prune_by_opacity(0.2)  # Lyra: prune ratio 0.8
    assert kept.num == int(53 * 0.2)  # floor(10.6) = 10
    top = torch.sort(g.opacities, descending=True).values[:10]
    assert torch.equal(kept.opacities, top)
    # the other fields travel with their opacity
    row = int(torch.argmax(g.opacities))
    assert torch.equal(kept.means[0], g.means[row]) and torch.equal(kept.colors[0], g.colors[row])
    assert g.prune_by_opacity(1.0).num == 53 and g.prune_by_opacity(0.0).num == 0
    with pytest.raises(LyraInputError, match="keep_fraction"):
        g.prune_by_opacity(1.5)


# ---------------------------------------------------------------------------------------------------------
# PLY
# ---------------------------------------------------------------------------------------------------------


def test_ply_round_trip_values_header_and_render(tmp_path: Path):
    g = random_gaussians(200, seed=4)
    # extreme but legal values must survive (gsplat's exporter drops non-finite rows)
    g.opacities[0], g.opacities[1], g.scales[2] = 0.0, 1.0, torch.zeros(3)
    path = g.to_ply(tmp_path / "scene.ply")
    header = path.read_bytes().split(b"end_header\n")[0].decode()
    assert "format binary_little_endian 1.0" in header and "element vertex 200" in header
    for name in ["x", "f_dc_0", "f_dc_2", "opacity", "scale_0", "rot_3"]:
        assert f"property float {name}\n" in header
    assert "f_rest" not in header

    back = Gaussians.from_ply(path)
    assert back.num == g.num and back.dtype == torch.float32
    for name in FIELDS:
        assert torch.allclose(getattr(back, name), getattr(g, name), atol=2e-6, rtol=1e-5), name

    viewmats, Ks = torch.eye(4)[None], torch.tensor([[60.0, 0, 32], [0, 60.0, 24], [0, 0, 1]])[None]
    a = rasterize(g, viewmats, Ks, 64, 48, background=torch.ones(3))
    b = rasterize(back, viewmats, Ks, 64, 48, background=torch.ones(3))
    assert float((a.rgb - b.rgb).abs().max()) < 1e-4 and float((a.alpha - b.alpha).abs().max()) < 1e-4


def test_ply_stores_lyra_conventions(tmp_path: Path):
    """f_dc = (rgb - 0.5) / SH_C0, opacity = logit, scale = log(scale + 1e-8), quaternions as w, x, y, z."""
    import numpy as np

    g = random_gaussians(3, seed=5)
    path = g.to_ply(tmp_path / "s.ply")
    raw = path.read_bytes()
    body = raw[raw.index(b"end_header\n") + len(b"end_header\n") :]
    rows = np.frombuffer(body, dtype="<f4").reshape(3, 14)  # x y z, f_dc*3, opacity, scale*3, rot*4
    assert np.allclose(rows[:, 3:6], ((g.colors - 0.5) / SH_C0).numpy(), atol=1e-6)
    assert np.allclose(rows[:, 6], torch.logit(g.opacities.double()).numpy(), atol=1e-5)
    assert np.allclose(rows[:, 7:10], torch.log(g.scales.double() + 1e-8).numpy(), atol=1e-6)
    assert np.allclose(rows[:, 10:14], g.quats.numpy(), atol=1e-7)


def test_from_ply_rejects_non_3dgs_files(tmp_path: Path):
    (tmp_path / "a.txt").write_text("hello\n")
    with pytest.raises(LyraInputError, match="not a PLY"):
        Gaussians.from_ply(tmp_path / "a.txt")
    (tmp_path / "b.ply").write_text("ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nend_header\n")
    with pytest.raises(LyraInputError, match="expected a binary PLY"):
        Gaussians.from_ply(tmp_path / "b.ply")
    (tmp_path / "c.ply").write_bytes(
        b"ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty float x\nend_header\n" + bytes(4)
    )
    with pytest.raises(LyraInputError, match="lacks 3DGS properties"):
        Gaussians.from_ply(tmp_path / "c.ply")


def test_importing_the_ops_does_not_import_gsplat():
    code = "import sys, lyra_ops.gaussians, lyra_ops.rasterize; assert 'gsplat' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_inria_layout_has_every_original_field_and_reads_back(tmp_path: Path):
    """``layout="inria"``: the original 3DGS vertex layout (normals, 45 f_rest, all zero), same values."""
    import numpy as np

    g = random_gaussians(7, seed=6)
    path = g.to_ply(tmp_path / "inria.ply", layout="inria")
    raw = path.read_bytes()
    header, body = raw.split(b"end_header\n")
    names = [line.split()[-1] for line in header.decode().splitlines() if line.startswith("property")]
    expected = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", *[f"f_rest_{i}" for i in range(45)],
                "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert names == expected
    rows = np.frombuffer(body, dtype="<f4").reshape(7, len(expected))
    assert not rows[:, 3:6].any() and not rows[:, 9:54].any()
    back, compact = Gaussians.from_ply(path), Gaussians.from_ply(g.to_ply(tmp_path / "c.ply"))
    for name in FIELDS:
        torch.testing.assert_close(getattr(back, name), getattr(compact, name), atol=1e-7, rtol=0)
    with pytest.raises(LyraInputError, match="PLY layout"):
        g.to_ply(tmp_path / "x.ply", layout="antimatter")


def test_select_for_export_thresholds_then_prunes():
    g = random_gaussians(10, seed=7)
    g.opacities[:] = torch.linspace(0.05, 0.95, 10)
    assert g.select_for_export() is g
    kept = g.select_for_export(min_opacity=0.5)
    torch.testing.assert_close(kept.opacities, g.opacities[5:])
    both = g.select_for_export(prune_ratio=0.4, min_opacity=0.5)  # 5 above 0.5, the 2 least opaque of them go
    torch.testing.assert_close(both.opacities, g.opacities[7:])
    torch.testing.assert_close(both.means, g.means[7:])  # original order kept
    for bad in ({"prune_ratio": 1.0}, {"min_opacity": -0.1}, {"prune_ratio": True}):
        with pytest.raises(LyraInputError, match="expected a number in"):
            g.select_for_export(**bad)
