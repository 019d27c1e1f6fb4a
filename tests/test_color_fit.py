"""lyra_ops.color_fit: colours solved so a render reproduces an image, against a dense least-squares reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lyra_ops.color_fit import fit_colors
from lyra_ops.errors import LyraInputError
from lyra_ops.gaussians import Gaussians
from lyra_ops.rasterize import rasterize

H, W = 12, 16
K = torch.tensor([[14.0, 0.0, W / 2], [0.0, 14.0, H / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)
VIEW = torch.eye(4, dtype=torch.float64)
BG = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64)


def scene(n: int = 6, seed: int = 0) -> Gaussians:
    """``n`` overlapping Gaussians in front of the identity camera, float64."""
    gen = torch.Generator().manual_seed(seed)
    xy = (torch.rand(n, 2, generator=gen, dtype=torch.float64) - 0.5) * torch.tensor([0.8, 0.6], dtype=torch.float64)
    z = 1.5 + torch.rand(n, 1, generator=gen, dtype=torch.float64)
    return Gaussians(
        means=torch.cat([xy * z, z], 1), scales=0.08 + 0.1 * torch.rand(n, 3, generator=gen, dtype=torch.float64),
        quats=torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64).repeat(n, 1),
        opacities=0.5 + 0.4 * torch.rand(n, generator=gen, dtype=torch.float64),
        colors=torch.rand(n, 3, generator=gen, dtype=torch.float64),
    )  # fmt: skip


def render(g: Gaussians, background: torch.Tensor = BG) -> torch.Tensor:
    return rasterize(g, VIEW[None], K[None], W, H, background=background).rgb[0]


def dense_solution(g: Gaussians, which: torch.Tensor, image: torch.Tensor, ridge: float) -> torch.Tensor:
    """The damped least-squares colours by the normal equations, with the render matrix built column by column
    (one render per fitted Gaussian, coloured white, everything else black on black)."""
    idx = which.nonzero().squeeze(1)
    black = torch.zeros(3, dtype=torch.float64)
    cols = []
    for j in idx:
        colors = torch.zeros_like(g.colors)
        colors[j] = 1.0
        cols.append(render(dataclasses.replace(g, colors=colors), black)[0].reshape(-1))
    a = torch.stack(cols, 1)  # (P, n): each channel sees the same weights
    residual = (image - render(g)).reshape(3, -1)
    lhs = a.T @ a + ridge * torch.eye(len(idx), dtype=torch.float64)
    delta = torch.linalg.solve(lhs, a.T @ residual.T)  # (n, 3)
    return g.colors[idx] + delta


@pytest.mark.parametrize("ridge", [0.0, 0.05, 1.0])
def test_cgls_reaches_the_dense_least_squares_colours(ridge: float) -> None:
    g = scene()
    which = torch.tensor([True, True, False, True, True, True])
    image = (render(scene(seed=1)) * 0.5 + 0.25).clamp(0, 1)
    expected = dense_solution(g, which, image, ridge)
    assert 0.0 <= float(expected.min()) and float(expected.max()) <= 1.0  # no clamping in this case
    out = fit_colors(g, which, VIEW, K, image, background=BG, ridge=ridge, iterations=3 * int(which.sum()))
    torch.testing.assert_close(out.colors[which], expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.colors[~which], g.colors[~which], atol=0, rtol=0)
    for name in ("means", "scales", "quats", "opacities"):
        torch.testing.assert_close(getattr(out, name), getattr(g, name), atol=0, rtol=0)


def test_undamped_fit_recovers_the_colours_that_made_the_image() -> None:
    truth = scene()
    image = render(truth)
    start = dataclasses.replace(truth, colors=torch.full_like(truth.colors, 0.5))
    out = fit_colors(start, torch.ones(truth.num, dtype=torch.bool), VIEW, K, image, background=BG, ridge=0.0,
                     iterations=3 * truth.num)
    torch.testing.assert_close(out.colors, truth.colors, atol=1e-6, rtol=0)


def test_damping_keeps_colours_near_their_start_and_the_result_is_clamped() -> None:
    g = scene()
    which = torch.ones(g.num, dtype=torch.bool)
    image = torch.ones(3, H, W, dtype=torch.float64)  # brighter than any mix can reach: clamped at 1
    loose = fit_colors(g, which, VIEW, K, image, background=BG, ridge=0.0, iterations=30)
    tight = fit_colors(g, which, VIEW, K, image, background=BG, ridge=1e6, iterations=30)
    assert float(loose.colors.max()) <= 1.0 and float(loose.colors.min()) >= 0.0
    assert float((loose.colors - g.colors).abs().max()) > 0.1
    assert float((tight.colors - g.colors).abs().max()) < 1e-3
    err = [float(((render(x) - image) ** 2).sum()) for x in (g, tight, loose)]
    assert err[0] >= err[1] > err[2]
    assert fit_colors(g, which, VIEW, K, image, background=BG, iterations=0) is g


def test_bad_arguments_name_what_is_expected() -> None:
    g = scene()
    which = torch.ones(g.num, dtype=torch.bool)
    image = torch.rand(3, H, W, dtype=torch.float64)
    with pytest.raises(LyraInputError, match="image must be a float tensor"):
        fit_colors(g, which, VIEW, K, image[0])
    with pytest.raises(LyraInputError, match="image must be a float tensor"):
        fit_colors(g, which, VIEW, K, (image * 255).to(torch.uint8))
    with pytest.raises(LyraInputError, match="which must be a bool tensor"):
        fit_colors(g, which[:-1], VIEW, K, image)
    with pytest.raises(LyraInputError, match="ridge"):
        fit_colors(g, which, VIEW, K, image, ridge=-1.0)
    with pytest.raises(LyraInputError, match="iterations"):
        fit_colors(g, which, VIEW, K, image, iterations=1.5)
