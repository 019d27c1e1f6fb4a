"""Teacher fine-tuning math (pure): the flow-matching objective of Wan / SD3-class models, GEN3C conditioning
inputs for a pixel-space teacher, training-pair crops and disocclusion scores.

Flow matching (rectified flow, as Wan 2.x and the diffusers ``FlowMatchEulerDiscreteScheduler`` use it):
``x_sigma = (1 - sigma) x0 + sigma noise`` for sigma in (0, 1]; the model predicts the velocity
``noise - x0``; the scheduler's timestep is ``1000 sigma``. An Euler step from sigma to sigma' is
``x + (sigma' - sigma) v``.
"""

from __future__ import annotations

import math

import torch


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift of SD3 / Wan schedulers: ``shift u / (1 + (shift - 1) u)`` (shift 1: identity)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sample_sigmas(n: int, generator: torch.Generator, *, shift: float = 1.0, logit_normal: bool = True,
                  sigma_min: float = 1e-3) -> torch.Tensor:
    """Training noise levels in [sigma_min, 1]: logit-normal (SD3's default density) or uniform, then shifted."""
    if logit_normal:
        u = torch.sigmoid(torch.randn(n, generator=generator))
    else:
        u = torch.rand(n, generator=generator)
    return shift_sigmas(u, shift).clamp(sigma_min, 1.0)


def _expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def flow_match_noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) x0 + sigma noise`` with one sigma per batch element."""
    s = _expand(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def flow_match_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model is trained to predict: ``noise - x0``."""
    return noise - x0


def predicted_x0(noisy: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The clean sample implied by a velocity prediction: ``x_sigma - sigma v``."""
    return noisy - _expand(sigma, noisy) * velocity


# GEN3C conditioning of the pixel-space teacher: channel order after the noisy frame (3 channels).
CONDITION_CHANNELS = (("warped_rgb", 3), ("mask", 1), ("first_frame", 3))
CONDITION_WIDTH = sum(c for _, c in CONDITION_CHANNELS)


def teacher_condition(warped: torch.Tensor, mask: torch.Tensor, first_frame: torch.Tensor) -> torch.Tensor:
    """(T,7,H,W) conditioning of a pixel-space teacher, in :data:`CONDITION_CHANNELS` order.

    ``warped`` (T,3,H,W) in [-1,1] with holes -1; ``mask`` (T,1,H,W) bool (GEN3C's ``2m - 1``);
    ``first_frame`` (3,H,W) in [0,1] (the input view, broadcast to every frame, in [-1,1])."""
    t = warped.shape[0]
    m = mask.to(warped.dtype) * 2.0 - 1.0
    first = (first_frame.to(warped.dtype) * 2.0 - 1.0).expand(t, -1, -1, -1)
    return torch.cat([torch.where(mask, warped, torch.full_like(warped, -1.0)), m, first], dim=1)


def crop_boxes(n: int, height: int, width: int, size: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """``n`` random top-left corners of ``size`` x ``size`` crops inside a height x width frame."""
    if size > height or size > width:
        raise ValueError(f"crop size {size} exceeds the {height}x{width} frames")
    ys = torch.randint(height - size + 1, (n,), generator=generator).tolist()
    xs = torch.randint(width - size + 1, (n,), generator=generator).tolist()
    return list(zip(ys, xs, strict=True))


def disoccluded(mask: torch.Tensor) -> torch.Tensor:
    """Pixels the teacher must invent: outside the warp mask, on every frame but the input frame 0."""
    holes = ~mask.bool()
    holes[0] = False
    return holes


def region_sse(pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> tuple[float, int]:
    """Summed squared error over the pixels of ``region`` ((T,1,H,W) bool, all channels) and the number of
    values summed (pool these across videos, then :func:`psnr_from_sse`)."""
    region = region.expand_as(pred)
    diff = (pred.double() - target.double()) ** 2
    return float(diff[region].sum()), int(region.sum())


def psnr_from_sse(sse: float, count: int) -> float:
    """PSNR from a summed squared error over ``count`` values (pooling regions across videos)."""
    if count == 0:
        return math.nan
    mse = sse / count
    return math.inf if mse == 0 else -10.0 * math.log10(mse)
