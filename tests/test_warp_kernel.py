"""The C kernel of the warp and of the conservative masking (``lyra_ops/_warp_cpu.c``) against the pure torch
paths (``LYRA_WARP_KERNEL=torch``) and the references, and its independence of the thread count."""

from __future__ import annotations

import pytest
import torch

from lyra_ops import warp_kernel
from lyra_ops.mask_refine import mesh_depth, refine_mask_conservative
from lyra_ops.warp import (
    WarpResult,
    depth_reliability_mask,
    forward_warp,
    forward_warp_reference,
    forward_warp_sources,
    unproject_depth,
)
from tests.test_mask_refine import K48, random_mesh, sideways, step_scene
from tests.test_warp import EYE, assert_close_warps, random_pose, random_scene

pytestmark = pytest.mark.skipif(warp_kernel.kernel() is None, reason="no C compiler: the torch paths run alone")


def both_paths(monkeypatch, fn):
    """``fn()`` with the C kernel, then with the pure torch path."""
    monkeypatch.setenv("LYRA_WARP_KERNEL", "auto")
    with_kernel = fn()
    monkeypatch.setenv("LYRA_WARP_KERNEL", "torch")
    without = fn()
    monkeypatch.setenv("LYRA_WARP_KERNEL", "auto")
    return with_kernel, without


def test_the_switch_selects_the_path(monkeypatch):
    monkeypatch.setenv("LYRA_WARP_KERNEL", "torch")
    assert warp_kernel.kernel() is None
    monkeypatch.setenv("LYRA_WARP_KERNEL", "auto")
    assert warp_kernel.kernel() is not None


def test_without_a_compiler_the_ops_fall_back_to_torch(monkeypatch, caplog):
    monkeypatch.setattr(warp_kernel, "_state", {})
    monkeypatch.setattr(warp_kernel, "_compiler", lambda: None)
    monkeypatch.setattr(warp_kernel, "_cache_dir", lambda: pytest.fail("nothing is built without a compiler"))
    assert warp_kernel.kernel() is None
    assert "no C compiler" in caplog.text
    image, depth, K = random_scene(9)
    w2c = random_pose(torch.Generator().manual_seed(9))
    assert_close_warps(forward_warp(image, depth, K, EYE, K, w2c),
                       forward_warp_reference(image, depth, K, EYE, K, w2c))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("channels", [1, 3, 5])
def test_kernel_warp_matches_reference_and_torch_path(monkeypatch, seed: int, channels: int):
    image, depth, K = random_scene(seed, channels=channels, holes=seed % 2 == 1)
    g = torch.Generator().manual_seed(200 + seed)
    w2c = torch.stack([random_pose(g, trans=0.2 * (i + 1)) for i in range(4)])
    w2c[3, :3, 3] += torch.tensor([0.0, 0.0, 2.5])  # points on and behind the camera plane
    mask = depth_reliability_mask(depth) if seed != 1 else None
    fast, torch_path = both_paths(monkeypatch, lambda: forward_warp(image, depth, K, EYE, K, w2c, source_mask=mask))
    ref = forward_warp_reference(image, depth, K, EYE, K, w2c, source_mask=mask)
    assert fast.mask.any() and not fast.mask.all()
    assert_close_warps(fast, ref)
    assert torch.equal(fast.mask, torch_path.mask)
    assert (fast.rgb - torch_path.rgb).abs().max().item() < 1e-5


def test_kernel_warp_is_bit_identical_for_any_thread_count():
    image, depth, K = random_scene(5, height=96, width=128)
    g = torch.Generator().manual_seed(5)
    w2c = torch.stack([random_pose(g, trans=0.4) for _ in range(3)])
    previous = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3, 7):
            torch.set_num_threads(threads)
            outs.append(forward_warp(image, depth, K, EYE, K, w2c))
    finally:
        torch.set_num_threads(previous)
    for out in outs[1:]:
        for field in ("rgb", "depth", "mask"):
            assert torch.equal(getattr(out, field), getattr(outs[0], field))


def test_kernel_several_sources_match_torch_path(monkeypatch):
    (im1, d1, K), (im2, d2, _) = random_scene(6), random_scene(7)
    c2w2 = torch.linalg.inv(random_pose(torch.Generator().manual_seed(1), trans=0.2))
    w2c = torch.stack([random_pose(torch.Generator().manual_seed(s)) for s in (2, 3)])
    fast, torch_path = both_paths(
        monkeypatch, lambda: forward_warp_sources([im1, im2], [d1, d2], [K, K], [EYE, c2w2], K, w2c))
    assert torch.equal(fast.mask, torch_path.mask) and fast.mask.any()
    assert (fast.rgb - torch_path.rgb).abs().max().item() < 1e-5


def test_kernel_leaves_float64_and_many_channels_to_torch(monkeypatch):
    image, depth, K = random_scene(8, channels=16)
    w2c = random_pose(torch.Generator().manual_seed(8))
    fast, torch_path = both_paths(monkeypatch, lambda: forward_warp(image, depth, K, EYE, K, w2c))
    assert torch.equal(fast.rgb, torch_path.rgb) and torch.equal(fast.mask, torch_path.mask)
    fast, torch_path = both_paths(monkeypatch, lambda: forward_warp(image[:3].double(), depth, K, EYE, K, w2c))
    assert fast.rgb.dtype == torch.float64 and torch.equal(fast.rgb, torch_path.rgb)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kernel_mesh_depth_is_bit_identical_to_the_torch_rasterizer(monkeypatch, seed: int):
    vertices, faces = random_mesh(seed)
    fast, torch_path = both_paths(monkeypatch, lambda: mesh_depth(vertices, faces, K48, 48, 64))
    assert torch.equal(fast, torch_path) and (fast > 0).float().mean() > 0.3
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # bands of rows per thread: the same z-buffer
        assert torch.equal(mesh_depth(vertices, faces, K48, 48, 64), fast)
    finally:
        torch.set_num_threads(previous)
    empty, _ = both_paths(monkeypatch, lambda: mesh_depth(vertices, faces[:0], K48, 48, 64))
    assert torch.equal(empty, torch.zeros(48, 64, dtype=torch.float64))
    behind, _ = both_paths(monkeypatch, lambda: mesh_depth(vertices * torch.tensor([1.0, 1.0, -1.0]) - 5.0,
                                                           faces[40:], K48, 48, 64))
    assert not behind.any()


def test_kernel_refine_matches_torch_path_and_leaves_the_input_untouched(monkeypatch):
    image, depth, K = step_scene()
    reliable = depth_reliability_mask(depth)
    points = unproject_depth(depth, K, EYE)
    w2c = torch.stack([sideways(0.4), sideways(-0.3), sideways(0.8)])
    warp = forward_warp(image, depth, K, EYE, K, w2c, source_mask=reliable)
    before = WarpResult(warp.rgb.clone(), warp.depth.clone(), warp.mask.clone())
    fast, torch_path = both_paths(
        monkeypatch, lambda: refine_mask_conservative(warp, points, ~reliable, w2c, K, hole_value=-0.75))
    assert (warp.mask & ~fast.mask).sum() > 20  # something was invalidated
    for field in ("rgb", "depth", "mask"):
        assert torch.equal(getattr(fast, field), getattr(torch_path, field))
        assert torch.equal(getattr(warp, field), getattr(before, field))
