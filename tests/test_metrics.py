import math

import pytest
import torch

from lyra_ops.cameras import default_intrinsics
from lyra_ops.metrics import mask_confusion, psnr, source_visibility
from lyra_ops.scenes import make_scene
from lyra_ops.trajectories import make_trajectory


def test_psnr_known_values():
    a = torch.rand(2, 3, 16, 16)
    assert torch.isinf(psnr(a, a)).all()
    noisy = (a + 0.1).clamp(0, 1)
    mse = ((noisy - a) ** 2).flatten(1).mean(1).double()
    assert torch.allclose(psnr(noisy, a), 10 * torch.log10(1 / mse))
    b = torch.zeros(1, 3, 4, 4)
    c = torch.full((1, 3, 4, 4), 0.1)
    assert psnr(c, b).item() == pytest.approx(20.0)  # mse 0.01 -> 20 dB
    m = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    m[..., :2, :] = True
    c2 = c.clone()
    c2[..., 2:, :] = 0.9  # outside the mask: ignored
    assert psnr(c2, b, m).item() == pytest.approx(20.0)
    assert math.isnan(psnr(c, b, torch.zeros_like(m)).item())


def test_source_visibility_identity_and_motion():
    scene = make_scene(3)
    h, w = 48, 80
    K = default_intrinsics(h, w)
    src = scene.render(torch.eye(4)[None], K[None], h, w)
    vis = source_visibility(scene, src.depth[0, 0], torch.eye(4), K, K)
    assert bool(vis.seen.all()) and not bool(vis.outside.any())
    cams = make_trajectory("left", K, h, w, 5, distance=0.6)
    gt = scene.render(cams.c2w[-1:], cams.K[-1:], h, w)
    vis = source_visibility(scene, gt.depth[0, 0], cams.c2w[-1], cams.K[-1], K)
    assert 0 < int((vis.inside & ~vis.seen).sum()) < h * w  # some disocclusion
    counts = mask_confusion(torch.ones(h, w, dtype=torch.bool), vis)
    assert counts["false_hole"] == 0 and counts["leak"] == counts["occluded"]
    assert 0 < counts["occluded_interior"] < counts["occluded"]
    assert counts["leak_interior"] == counts["occluded_interior"]
    counts = mask_confusion(torch.zeros(h, w, dtype=torch.bool), vis)
    assert counts["leak"] == 0 and counts["false_hole"] == counts["seen"]


def test_ssim_known_values():
    """SSIM as used by evaluation (torchmetrics, 11x11 Gaussian window, data range 1) on closed-form cases."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    a = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ssim(a, a, data_range=1.0).item() == pytest.approx(1.0, abs=1e-6)
    # constant images: only the luminance term remains, (2 a b + C1) / (a^2 + b^2 + C1), C1 = 0.01^2
    x, y = torch.full((1, 1, 32, 32), 0.2), torch.full((1, 1, 32, 32), 0.6)
    c1 = 0.01**2
    assert ssim(x, y, data_range=1.0).item() == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1), rel=1e-3)
    # a period-2 checkerboard shifted by one pixel is its own negative: PSNR 0 dB, SSIM close to -1
    board = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2).float()[None, None]
    shifted = torch.roll(board, 1, dims=-1)
    assert psnr(shifted, board).item() == pytest.approx(0.0, abs=1e-9)
    assert ssim(shifted, board, data_range=1.0).item() < -0.9
    # known noise level: PSNR of additive N(0, sigma^2) noise (no clipping: mid-grey image) is -20 log10(sigma)
    grey = torch.full((1, 3, 256, 256), 0.5)
    noisy = grey + 0.02 * torch.randn(grey.shape, generator=torch.Generator().manual_seed(1))
    assert psnr(noisy, grey).item() == pytest.approx(-20 * math.log10(0.02), abs=0.05)
    assert 0.0 < ssim(noisy, grey, data_range=1.0).item() < 1.0
