"""Distillation losses: SSI depth (valid-pixel statistics), opacity penalty, optional LPIPS, NaN guard."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lyra_ops.errors import LyraConfigError, LyraInputError
from lyra_ops.losses import (
    LPIPS_SKIPPED_MESSAGE,
    LossWeights,
    LPIPSLoss,
    depth_loss_log_l1,
    depth_loss_ssi,
    distillation_loss,
    make_lpips,
    opacity_loss,
)
from lyra_ops.rasterize import RasterOutput


def reference_depth_loss_buggy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reference's normaliser (spec 5.2): median of D * v over ALL pixels, mean over all pixels."""
    valid = ((target > 0) & torch.isfinite(target)).float()

    def norm(d: torch.Tensor) -> torch.Tensor:
        n = d.shape[0]
        dv = (d * valid).reshape(n, -1)
        m = dv.median(dim=1, keepdim=True).values
        v = valid.reshape(n, -1)
        c = (dv - m) * v
        s = (c.abs().sum(1, keepdim=True) / v.sum(1, keepdim=True).clamp(min=1)).clamp(1e-3, 1e3)
        return c / s

    return F.smooth_l1_loss(norm(pred), norm(target), beta=1.0)


def depth_pair(seed: int = 0, n: int = 2, h: int = 12, w: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    target = torch.rand(n, 1, h, w, generator=gen) * 5 + 0.5
    pred = target + 0.3 * torch.randn(n, 1, h, w, generator=gen)
    return pred, target


# --- depth ------------------------------------------------------------------------------------------------------


def test_depth_known_value_and_identity() -> None:
    target = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    pred = torch.tensor([1.0, 1.0, 1.0, 5.0]).reshape(1, 1, 1, 4)
    # target: median 2 (lower median), deviations [-1, 0, 1, 2], scale 1; pred: median 1, [0, 0, 0, 4], scale 1;
    # differences [1, 0, 1, 2] -> SmoothL1 [0.5, 0, 0.5, 1.5] -> mean 0.625
    torch.testing.assert_close(depth_loss_ssi(pred, target), torch.tensor(0.625))
    _, t = depth_pair()
    assert depth_loss_ssi(t, t).item() == 0.0


def test_depth_is_scale_and_shift_invariant() -> None:
    pred, target = depth_pair(seed=1)
    base = depth_loss_ssi(pred, target)
    assert base > 0.01
    torch.testing.assert_close(depth_loss_ssi(3.0 * pred + 2.0, target), base, atol=1e-6, rtol=1e-5)
    assert depth_loss_ssi(0.25 * target + 7.0, target) < 1e-6


def test_invalid_pixels_do_not_change_the_loss() -> None:
    """With 60 % of pixels invalid the reference's unmasked median is 0 and a scaled+shifted prediction is
    penalised; here the statistics and the average use valid pixels only."""
    _, target = depth_pair(seed=2, n=2, h=10, w=10)
    gen = torch.Generator().manual_seed(3)
    pred = 2.0 * target + 20.0
    invalid = torch.zeros_like(target, dtype=torch.bool)
    invalid[:, :, :6] = True  # rows 0-5 invalid: 60 %
    target_holes = target.masked_fill(invalid, 0.0)
    pred_junk = torch.where(invalid, torch.rand(target.shape, generator=gen) * 100, pred)
    assert depth_loss_ssi(pred_junk, target_holes) < 1e-6
    assert reference_depth_loss_buggy(pred_junk, target_holes) > 0.02  # what the bug does
    # any junk in invalid pixels gives the loss of the valid crop alone
    noisy = pred + 0.5 * torch.randn(target.shape, generator=gen)
    crop = depth_loss_ssi(noisy[:, :, 6:], target[:, :, 6:])
    for fill in (0.0, 1e4):
        junk = torch.where(invalid, torch.full_like(noisy, fill), noisy)
        torch.testing.assert_close(depth_loss_ssi(junk, target_holes), crop)
    # an explicit mask hides even positive, finite target values
    junk_target = torch.where(invalid, torch.full_like(target, 50.0), target)
    torch.testing.assert_close(depth_loss_ssi(noisy, junk_target, ~invalid), crop)
    nan_target = torch.where(invalid, torch.full_like(target, float("nan")), target)
    torch.testing.assert_close(depth_loss_ssi(noisy, nan_target), crop)


def test_depth_empty_mask_is_zero_and_differentiable() -> None:
    pred = torch.rand(2, 1, 4, 4, requires_grad=True)
    loss = depth_loss_ssi(pred, torch.zeros(2, 1, 4, 4))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))
    # one image empty, the other valid: the empty one contributes nothing
    pred2, target2 = depth_pair(seed=4, n=2)
    target2[0] = 0.0
    torch.testing.assert_close(depth_loss_ssi(pred2, target2), depth_loss_ssi(pred2[1:], target2[1:]))


def test_depth_gradients_finite_and_shape_errors() -> None:
    pred, target = depth_pair(seed=5)
    pred.requires_grad_(True)
    depth_loss_ssi(pred, target).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    with pytest.raises(LyraInputError, match="same shape"):
        depth_loss_ssi(pred[:1], target)
    with pytest.raises(LyraInputError, match=r"\(N, 1, H, W\)"):
        depth_loss_ssi(pred[:, 0], target[:, 0])


def test_depth_log_l1_known_value_identity_and_mask() -> None:
    target = torch.tensor([1.0, 2.0, 4.0, 0.0]).reshape(1, 1, 1, 4)  # the last pixel has no depth
    pred = torch.tensor([2.0, 2.0, 1.0, 9.0]).reshape(1, 1, 1, 4)
    # |log 2 - log 1| = ln 2, 0, |log 1 - log 4| = 2 ln 2 -> mean over the 3 valid pixels = ln 2
    torch.testing.assert_close(depth_loss_log_l1(pred, target), torch.tensor(math.log(2.0)))
    _, t = depth_pair()
    assert depth_loss_log_l1(t, t).item() == 0.0
    # metric, not scale-invariant: a global factor k costs |ln k|
    torch.testing.assert_close(depth_loss_log_l1(3.0 * t, t), torch.tensor(math.log(3.0)))
    # an explicit mask is intersected with target > 0; non-finite targets are invalid
    mask = torch.tensor([True, False, True, True]).reshape(1, 1, 1, 4)
    torch.testing.assert_close(depth_loss_log_l1(pred, target, mask), torch.tensor(1.5 * math.log(2.0)))
    nan_target = torch.tensor([1.0, float("nan"), 4.0, float("inf")]).reshape(1, 1, 1, 4)
    torch.testing.assert_close(depth_loss_log_l1(pred, nan_target), torch.tensor(1.5 * math.log(2.0)))
    # the prediction is clamped to >= 1e-3 before its log (a zero render depth stays finite)
    zero = depth_loss_log_l1(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    torch.testing.assert_close(zero, torch.tensor(-math.log(1e-3)))


def test_depth_log_l1_empty_mask_gradients_and_shape_errors() -> None:
    pred = torch.rand(2, 1, 4, 4, requires_grad=True)
    loss = depth_loss_log_l1(pred, torch.zeros(2, 1, 4, 4))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))
    pred, target = depth_pair(seed=6)
    pred = pred.clamp(min=0.1).requires_grad_(True)
    depth_loss_log_l1(pred, target).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    with pytest.raises(LyraInputError, match="same shape"):
        depth_loss_log_l1(pred[:1], target)


# --- opacity ----------------------------------------------------------------------------------------------------


def test_opacity_loss_applies_no_second_sigmoid() -> None:
    op = torch.tensor([0.2, 0.4, 0.0, 1.0])
    torch.testing.assert_close(opacity_loss(op), torch.tensor(0.4))
    assert not torch.isclose(opacity_loss(op), torch.sigmoid(op).mean())  # the reference's double sigmoid
    assert opacity_loss(torch.zeros(0)).item() == 0.0


# --- distillation total and NaN guard ------------------------------------------------------------------------


def render_pair(seed: int = 0) -> tuple[RasterOutput, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rgb = torch.rand(2, 3, 16, 16, generator=gen)
    depth = torch.rand(2, 1, 16, 16, generator=gen) + 1
    render = RasterOutput(rgb=rgb, depth=depth, alpha=torch.ones(2, 1, 16, 16))
    return render, torch.rand(2, 3, 16, 16, generator=gen), torch.rand(2, 1, 16, 16, generator=gen) + 1


def test_distillation_weights_and_parts() -> None:
    render, target_rgb, target_depth = render_pair()
    opac = torch.tensor([0.1, 0.3])
    total, parts = distillation_loss(render, target_rgb, target_depth, opac)
    assert set(parts) == {"mse", "depth", "total"}  # opacity weight 0 by default, no LPIPS configured
    torch.testing.assert_close(total, parts["mse"] + 0.05 * parts["depth"])
    total, parts = distillation_loss(render, target_rgb, target_depth, opac, weights=LossWeights(opacity=0.1))
    torch.testing.assert_close(total, parts["mse"] + 0.05 * parts["depth"] + 0.1 * torch.tensor(0.2))
    total, parts = distillation_loss(render, render.rgb, render.depth)
    assert total.item() == 0.0


def test_distillation_depth_mode_log_l1() -> None:
    render, target_rgb, target_depth = render_pair()
    weights = LossWeights(depth_mode="log_l1", depth=0.2)
    total, parts = distillation_loss(render, target_rgb, target_depth, weights=weights)
    torch.testing.assert_close(parts["depth"], depth_loss_log_l1(render.depth, target_depth))
    torch.testing.assert_close(total, parts["mse"] + 0.2 * parts["depth"])
    ssi = distillation_loss(render, target_rgb, target_depth)[1]["depth"]
    assert not torch.isclose(parts["depth"], ssi)
    assert LossWeights().depth_mode == "ssi" and LossWeights().gaussian_depth == 0.0  # Lyra's defaults
    with pytest.raises(LyraConfigError, match="depth_mode"):
        LossWeights(depth_mode="l2")


def test_nan_guard_names_the_part() -> None:
    render, target_rgb, target_depth = render_pair()
    bad_rgb = render.rgb.clone()
    bad_rgb[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="mse=nan"):
        distillation_loss(RasterOutput(bad_rgb, render.depth, render.alpha), target_rgb, target_depth)
    bad_depth = render.depth.clone()
    bad_depth[1, 0, 3, 3] = float("inf")
    with pytest.raises(FloatingPointError, match="depth=(nan|inf)") as info:
        distillation_loss(RasterOutput(render.rgb, bad_depth, render.alpha), target_rgb, target_depth)
    assert "mse" not in str(info.value)
    with pytest.raises(FloatingPointError, match="opacity"):
        distillation_loss(render, target_rgb, None, torch.tensor([float("nan")]), weights=LossWeights(opacity=0.1))


# --- LPIPS ------------------------------------------------------------------------------------------------------


def lpips_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in the lpips package's full layout (with its duplicate ``lins.*`` entries)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in LPIPSLoss().state_dict().items():
        if key.startswith("scaling_layer"):
            state[key] = value
        elif key.startswith("lin"):
            state[key] = torch.rand(value.shape, generator=gen) * 0.1
        else:
            state[key] = torch.randn(value.shape, generator=gen) * (0.05 if key.endswith("weight") else 0.01)
    for k in range(5):
        state[f"lins.{k}.model.1.weight"] = state[f"lin{k}.model.1.weight"]
    return state


@pytest.fixture(scope="module")
def random_lpips_state() -> dict[str, torch.Tensor]:
    return lpips_state()


def test_make_lpips_without_weights_logs_once_and_returns_none(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="lyra_ops.losses"):
        assert make_lpips(None) is None
    assert [r.getMessage() for r in caplog.records] == [LPIPS_SKIPPED_MESSAGE]
    with pytest.raises(LyraConfigError, match="no file at"):
        make_lpips("/nonexistent/vgg.pth")


def test_lpips_loads_local_weights_and_behaves(tmp_path: Path, random_lpips_state) -> None:
    state = random_lpips_state
    full = tmp_path / "lpips_vgg_full.pth"
    torch.save(state, full)
    lp = make_lpips(full)
    assert isinstance(lp, LPIPSLoss)
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(3, 3, 32, 32, generator=gen)
    b = torch.rand(3, 3, 32, 32, generator=gen)
    assert lp(a, a).abs().max() < 1e-6
    d = lp(a, b)
    assert d.shape == (3,) and (d > 0).all()
    # the package's two files: linear heads + a torchvision VGG16 state dict
    lins = tmp_path / "vgg.pth"
    torch.save({k: v for k, v in state.items() if k.startswith("lin")}, lins)
    backbone = {"features." + k.split(".", 2)[2]: v for k, v in state.items() if k.startswith("net.")}
    backbone["classifier.0.weight"] = torch.zeros(1)
    vgg = tmp_path / "vgg16.pth"
    torch.save(backbone, vgg)
    torch.testing.assert_close(make_lpips(lins, backbone_path=vgg)(a, b), d)
    # gradients reach the images, not the frozen network
    x = a.clone().requires_grad_(True)
    _, parts = distillation_loss(RasterOutput(x, torch.ones(3, 1, 32, 32), x[:, :1]), b, lpips=lp)
    parts["total"].backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in lp.parameters())
    torch.testing.assert_close(parts["total"], parts["mse"] + 0.5 * d.mean())
    bad = dict(state)
    bad["lin0.model.1.weight"] = torch.zeros(1, 32, 1, 1)
    with pytest.raises(LyraConfigError, match=r"lin0.model.1.weight: expected \(1, 64, 1, 1\)"):
        LPIPSLoss().load_lpips_state(bad)
    del bad["net.slice5.28.bias"]
    with pytest.raises(LyraConfigError, match="missing.*net.slice5.28.bias"):
        LPIPSLoss().load_lpips_state(bad)


def test_lpips_resizes_tall_images(random_lpips_state) -> None:
    lp = LPIPSLoss(max_height=16)
    lp.load_lpips_state(random_lpips_state)
    a = torch.rand(1, 3, 32, 48)
    small = F.interpolate(a, size=(16, 24), mode="bilinear", align_corners=False, antialias=True)
    b = torch.rand(1, 3, 32, 48)
    small_b = F.interpolate(b, size=(16, 24), mode="bilinear", align_corners=False, antialias=True)
    unresized = LPIPSLoss(max_height=None)
    unresized.load_lpips_state(random_lpips_state)
    torch.testing.assert_close(lp(a, b), unresized(small, small_b))
