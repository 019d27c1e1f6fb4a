"""LatentGaussianDecoder: config presets, shapes, activations, determinism, gradients, overfit, checkpoints."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import pytest
import torch

import lyra_ops.decoder as decoder_mod
from lyra_ops.cameras import Cameras, default_intrinsics
from lyra_ops.decoder import (
    ATTENTION,
    COLOR_SKIP_EPS,
    CPU_LAYOUT,
    MAMBA2,
    DecoderConfig,
    LatentGaussianDecoder,
    block_colors,
    block_distance,
    ceiling_gaussians,
    fused_keep,
    gaussian_processing,
    load_decoder_state,
    lyra_block_pattern,
    output_frames,
    output_rays,
    ray_distance,
    with_render,
)
from lyra_ops.errors import LyraConfigError
from lyra_ops.latents import PixelPatchifyEncoder
from lyra_ops.losses import distillation_loss
from lyra_ops.plucker import encode_plucker, pixel_rays, plucker_embedding
from lyra_ops.rasterize import rasterize

ENC = PixelPatchifyEncoder()


def trajectory(t: int, h: int, w: int, x0: float) -> Cameras:
    """t cameras looking down +z, sliding along x from x0."""
    c2w = torch.eye(4).repeat(t, 1, 1)
    c2w[:, 0, 3] = x0 + torch.linspace(0.0, 0.4, t)
    return Cameras(c2w, default_intrinsics(h, w).repeat(t, 1, 1), h, w)


def make_inputs(v: int = 2, t: int = 9, h: int = 64, w: int = 96, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cams = [trajectory(t, h, w, float(i)) for i in range(v)]
    frames = [torch.rand(t, 3, h, w, generator=gen) * 2 - 1 for _ in range(v)]
    latents = torch.stack([ENC.encode(f) for f in frames])
    plucker = torch.stack([encode_plucker(plucker_embedding(c), ENC) for c in cams])
    return latents, plucker, cams


@pytest.fixture(scope="module")
def inputs():
    return make_inputs()


# Lyra's Gaussian layout and activations are the dataclass defaults (the ``paper`` preset keeps them); the CPU
# presets ``tiny`` / ``small`` carry ``CPU_LAYOUT`` instead. Tests of Lyra's constants build this config.
LYRA_TINY = DecoderConfig(width=64, depth=2, heads=4)
# The CPU layout's grid alone (every output frame stacked, no input head), for tests of the grid's own semantics.
GRID_TINY = DecoderConfig.preset("tiny", fuse="stack", input_stride=0)


@pytest.fixture(scope="module")
def tiny() -> LatentGaussianDecoder:
    return LatentGaussianDecoder(DecoderConfig.preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def lyra_tiny() -> LatentGaussianDecoder:
    return LatentGaussianDecoder(LYRA_TINY, seed=0)


# --- config -------------------------------------------------------------------------------------------------


def test_presets_and_config_round_trip() -> None:
    paper = DecoderConfig.preset("paper")
    assert (paper.width, paper.depth, paper.heads, paper.patch_size) == (512, 16, 8, (1, 2, 2))
    assert paper.block_types == lyra_block_pattern(16)
    assert paper.block_types == ((MAMBA2,) * 7 + (ATTENTION,)) * 2
    assert (paper.latent_channels, paper.plucker_channels) == (16, 32)
    # paper = Lyra: activation constants and Gaussian layout are the dataclass defaults
    assert (paper.near, paper.far, paper.distance_shift, paper.scale_cap, paper.opacity_shift) == (
        0.1,
        500.0,
        -1.65,
        0.3,
        -2.0,
    )
    lyra_layout = ("gaussian_stride", "gaussian_frames", "distance_param", "scale_param", "color_skip", "head_gain")
    assert tuple(getattr(paper, k) for k in lyra_layout) == (8, "all", "linear", "absolute", False, 1.0)
    assert all(getattr(paper, k) == getattr(LYRA_TINY, k) for k in (*lyra_layout, "near", "far", "opacity_shift"))
    # tiny / small = the CPU layout (issue 13), over Lyra's distance shift and scale cap
    tiny = DecoderConfig.preset("tiny")
    assert (tiny.latent_channels, tiny.plucker_channels) == (1536, 48)
    for cfg in (tiny, DecoderConfig.preset("small")):
        assert {k: getattr(cfg, k) for k in CPU_LAYOUT} == CPU_LAYOUT
    assert (tiny.near, tiny.far, tiny.gaussian_stride, tiny.gaussian_frames) == (0.1, 20.0, 4, "keyframes")
    assert (tiny.distance_param, tiny.distance_init) == ("log", 3.0)
    assert (tiny.scale_param, tiny.scale_init) == ("footprint", 0.35)
    assert (tiny.color_skip, tiny.head_gain, tiny.opacity_shift) == (True, 0.1, 1.0)
    assert (tiny.distance_shift, tiny.scale_cap) == (-1.65, 0.3)
    small = DecoderConfig.preset("small")
    assert DecoderConfig.from_dict(small.to_dict()) == small
    assert DecoderConfig.preset("paper", latent_channels=1536).latent_channels == 1536
    with pytest.raises(LyraConfigError, match="did you mean 'tiny'"):
        DecoderConfig.preset("tinny")
    with pytest.raises(LyraConfigError, match="did you mean 'width'"):
        DecoderConfig.from_dict({"widht": 8})
    with pytest.raises(LyraConfigError, match="divisible by decoder.heads"):
        DecoderConfig(width=30, heads=4, depth=1)
    with pytest.raises(LyraConfigError, match="block_types"):
        DecoderConfig(depth=2, block_types=("attention",))
    # the layout fields are validated
    for bad in ({"gaussian_stride": 3}, {"gaussian_stride": 0}, {"gaussian_stride": 16}, {"gaussian_stride": True}):
        with pytest.raises(LyraConfigError, match="gaussian_stride"):
            DecoderConfig(**bad)
    for key in ("gaussian_frames", "distance_param", "scale_param"):
        with pytest.raises(LyraConfigError, match=key):
            DecoderConfig(**{key: "bogus"})
    for value in (0.1, 20.0, 0.05):
        with pytest.raises(LyraConfigError, match="distance_init"):
            DecoderConfig.preset("tiny", distance_init=value)
    with pytest.raises(LyraConfigError, match="scale_init"):
        DecoderConfig(scale_init=0.0)
    with pytest.raises(LyraConfigError, match="head_gain"):
        DecoderConfig(head_gain=-1.0)
    with pytest.raises(LyraConfigError, match="color_skip"):
        DecoderConfig.preset("tiny", latent_channels=16, plucker_channels=32)
    assert DecoderConfig.from_dict(tiny.to_dict()) == tiny


# --- forward --------------------------------------------------------------------------------------------------


def test_lyra_layout_forward_counts_ranges_and_rays(lyra_tiny: LatentGaussianDecoder, inputs) -> None:
    latents, plucker, cams = inputs
    with torch.no_grad():
        raw = lyra_tiny.forward_raw(latents, plucker)
        g = lyra_tiny(latents, plucker, cams)
    assert raw.shape == (2, 12, 9, 8, 12)  # T = 8 T_l - 7, one Gaussian per 8x8 block
    assert g.num == 2 * 9 * (64 // 8) * (96 // 8)
    for name in ("means", "scales", "quats", "opacities", "colors"):
        assert torch.isfinite(getattr(g, name)).all(), name
    assert g.scales.max() <= 0.3 and g.scales.min() > 0
    assert g.opacities.min() > 0 and g.opacities.max() < 1
    assert g.colors.min() > 0 and g.colors.max() < 1
    torch.testing.assert_close(g.quats.norm(dim=-1), torch.ones(g.num))
    # means lie on the 1/8-res rays (view-major, then t, h, w) at distances in [near, far]
    rays = [pixel_rays(c, downsample=8) for c in cams]
    origins = torch.stack([o for o, _ in rays]).reshape(-1, 3)
    dirs = torch.stack([d for _, d in rays]).reshape(-1, 3)
    offset = g.means - origins
    dist = (offset * dirs).sum(-1)
    assert dist.min() >= 0.1 - 1e-4 and dist.max() <= 500.0 + 1e-3
    perpendicular = offset - dist[:, None] * dirs
    assert perpendicular.norm(dim=-1).max() < 1e-3
    # and equal the documented activation of the raw head output
    flat = raw.permute(0, 2, 3, 4, 1).reshape(-1, 12)
    w = torch.sigmoid(flat[:, 0] - 1.65)
    torch.testing.assert_close(dist, 0.1 * (1 - w) + 500.0 * w, atol=2e-3, rtol=1e-5)
    torch.testing.assert_close(g.opacities, torch.sigmoid(flat[:, 11] - 2.0))
    scale = torch.minimum(torch.exp(flat[:, 4:7] - (1 - math.log(0.3))), torch.tensor(0.3))
    torch.testing.assert_close(g.scales, scale)
    torch.testing.assert_close(g.colors, 0.5 * torch.tanh(flat[:, 1:4]) + 0.5)


def test_cpu_layout_forward_counts_ranges_and_rays(tiny: LatentGaussianDecoder, inputs) -> None:
    """CPU layout: one Gaussian per 4x4 block of the keyframes 0, 8 (one per latent frame), log distance,
    footprint scale, colour residual on the block's input colour, opacity shift +1; before them, the input
    head's Gaussian per input pixel."""
    latents, plucker, cams = inputs
    cfg = tiny.config
    v, t_l, h, w = 2, 2, 64, 96
    with torch.no_grad():
        raw = tiny.forward_raw(latents, plucker)
        whole = tiny(latents, plucker, cams, prune=False)
        fused = tiny(latents, plucker, cams)  # nothing known: only the input frame's grid gives way to the head
        origins, dirs, foot = tiny.rays(cams, torch.device("cpu"))
    assert raw.shape == (v, 12, t_l, h // 4, w // 4)
    assert whole.num == h * w + 1536 and fused.num == whole.num - (h // 4) * (w // 4)
    g = whole.index(slice(h * w, None))
    assert g.num == v * t_l * (h // 4) * (w // 4) == 1536
    assert origins.shape == dirs.shape == (v, t_l, h // 4, w // 4, 3) and foot.shape == (v, t_l, h // 4, w // 4, 1)
    for name in ("means", "scales", "quats", "opacities", "colors"):
        assert torch.isfinite(getattr(g, name)).all(), name
    assert g.scales.max() <= 0.3 and g.scales.min() > 0
    assert g.opacities.min() > 0 and g.opacities.max() < 1
    assert g.colors.min() > 0 and g.colors.max() < 1
    torch.testing.assert_close(g.quats.norm(dim=-1), torch.ones(g.num))
    # the rays are the 1/4-res rays of frames 0 and 8 (view-major, then t, h, w); footprint = stride / fx
    keyframes = torch.tensor([0, 8])
    rays = [pixel_rays(c[keyframes], downsample=4) for c in cams]
    torch.testing.assert_close(origins, torch.stack([o for o, _ in rays]))
    torch.testing.assert_close(dirs, torch.stack([d for _, d in rays]))
    fx = cams[0].K[0, 0, 0]
    torch.testing.assert_close(foot, torch.full_like(foot, 4.0) / fx)
    origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    offset = g.means - origins
    dist = (offset * dirs).sum(-1)
    assert dist.min() >= 0.1 - 1e-5 and dist.max() <= 20.0 + 1e-4
    assert (offset - dist[:, None] * dirs).norm(dim=-1).max() < 1e-4
    # the documented activations of the raw head output
    flat = raw.permute(0, 2, 3, 4, 1).reshape(-1, 12)
    frac = math.log(3.0 / 0.1) / math.log(20.0 / 0.1)  # distance_init 3 as a fraction of log(far / near)
    wgt = torch.sigmoid(flat[:, 0] + math.log(frac / (1 - frac)))
    torch.testing.assert_close(dist, 0.1 * (20.0 / 0.1) ** wgt, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(g.opacities, torch.sigmoid(flat[:, 11] + 1.0))
    scale = (0.35 * (4.0 / fx) * dist[:, None] * torch.exp(flat[:, 4:7])).clamp(max=0.3)
    torch.testing.assert_close(g.scales, scale, atol=1e-6, rtol=1e-5)
    base = block_colors(latents, cfg).permute(0, 1, 3, 4, 2).reshape(-1, 3).clamp(COLOR_SKIP_EPS, 1 - COLOR_SKIP_EPS)
    torch.testing.assert_close(g.colors, torch.sigmoid(torch.logit(base) + flat[:, 1:4]))


def test_output_frames_both_modes() -> None:
    keyframes = DecoderConfig.preset("tiny")
    assert output_frames(LYRA_TINY, 1) == [0] == output_frames(keyframes, 1)
    assert output_frames(LYRA_TINY, 2) == list(range(9))  # 8 T_l - 7 frames
    assert output_frames(LYRA_TINY, 4) == list(range(25))
    assert output_frames(keyframes, 2) == [0, 8]
    assert output_frames(keyframes, 4) == [0, 8, 16, 24]


def test_block_colors_are_the_block_means_of_the_output_frames(inputs) -> None:
    latents, _, _ = inputs
    cfg = DecoderConfig.preset("tiny")
    out = block_colors(latents, cfg)
    assert out.shape == (2, 2, 3, 16, 24)
    for v in range(2):
        frames = ENC.decode(latents[v])[[0, 8]] * 0.5 + 0.5
        torch.testing.assert_close(out[v], torch.nn.functional.avg_pool2d(frames, 4))
    lyra = block_colors(latents, LYRA_TINY)  # every frame, 8x8 blocks
    assert lyra.shape == (2, 9, 3, 8, 12)


def block_constant_inputs(t: int = 9, h: int = 64, w: int = 96, seed: int = 0):
    """One view whose frames are constant over 4x4 blocks, with block colours spread over [0.05, 0.95]."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.rand(t, 3, h // 4, w // 4, generator=gen) * 0.9 + 0.05
    frames = torch.nn.functional.interpolate(blocks, scale_factor=4, mode="nearest")
    cams = [trajectory(t, h, w, 0.0)]
    latents = ENC.encode(frames * 2 - 1)[None]
    plucker = encode_plucker(plucker_embedding(cams[0]), ENC)[None]
    return latents, plucker, cams, blocks


def test_fresh_cpu_model_starts_at_its_inputs() -> None:
    """head_gain 0.1: a fresh tiny model's Gaussians carry their block's input colour (colour skip), sit near
    distance_init = 3, cover scale_init of their block and have opacity ~ sigmoid(1)."""
    latents, plucker, cams, blocks = block_constant_inputs()
    model = LatentGaussianDecoder(GRID_TINY, seed=0)
    with torch.no_grad():
        g = model(latents, plucker, cams)
        origins, dirs, foot = model.rays(cams, torch.device("cpu"))
    expected = blocks[[0, 8]].permute(0, 2, 3, 1).reshape(-1, 3)
    err = (g.colors - expected).abs()
    # measured (seeds 0-2): max 0.027-0.030, mean 0.005 (the head's rgb output is ~0.1 in logit space)
    assert err.max() < 0.05 and err.mean() < 0.01, (err.max(), err.mean())
    assert (0.5 * torch.tanh(torch.zeros(1)) + 0.5 - expected).abs().mean() > 0.15  # what Lyra's colour would give
    dist = ((g.means - origins.reshape(-1, 3)) * dirs.reshape(-1, 3)).sum(-1)
    assert (dist / 3.0).log().abs().max() < 0.25, (dist.min(), dist.max())  # measured 2.54 .. 3.51
    assert abs(float(dist.mean()) - 3.0) < 0.1
    rel = g.scales / (0.35 * foot.reshape(-1, 1) * dist[:, None])
    assert rel.log().abs().max() < 0.25, (rel.min(), rel.max())  # measured 0.89 .. 1.12
    assert (g.opacities - 1 / (1 + math.exp(-1.0))).abs().max() < 0.05  # measured <= 0.025


def test_views_are_fused_view_major(inputs) -> None:
    """No positional embedding + attention-only blocks: swapping the views swaps the two halves of the output."""
    latents, plucker, cams = inputs
    tiny = LatentGaussianDecoder(GRID_TINY, seed=0)
    with torch.no_grad():
        g = tiny(latents, plucker, cams)
        swapped = tiny(latents.flip(0), plucker.flip(0), cams[::-1])
    half = g.num // 2
    torch.testing.assert_close(swapped.means[:half], g.means[half:], atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(swapped.colors[half:], g.colors[:half], atol=1e-5, rtol=1e-5)


def test_gaussian_processing_extremes() -> None:
    cfg = LYRA_TINY  # Lyra's activations (linear distance, absolute scale, tanh colour, opacity shift -2)
    raw = torch.zeros(3, 12)
    raw[0, 0], raw[1, 0] = -1e4, 1e4  # distance saturates at near / far
    raw[:, 4:7] = torch.tensor([[10.0], [-10.0], [1.0]])  # scale: capped, small, exactly 0.3 at s = 1
    raw[:, 7] = 1.0
    o = torch.tensor([[1.0, 2.0, 3.0]]).expand(3, 3)
    d = torch.tensor([[0.0, 0.0, 1.0]]).expand(3, 3)
    g = gaussian_processing(raw, o, d, cfg)
    torch.testing.assert_close(g.means[:2, 2], torch.tensor([3.1, 503.0]))
    torch.testing.assert_close(
        g.means[2, 2], torch.tensor(3.0 + 0.1 * (1 - 1 / (1 + math.exp(1.65)))) + 500.0 / (1 + math.exp(1.65))
    )
    torch.testing.assert_close(g.scales[:, 0], torch.tensor([0.3, 0.3 * math.exp(-11.0), 0.3]))
    torch.testing.assert_close(g.opacities, torch.full((3,), 1 / (1 + math.exp(2.0))))
    torch.testing.assert_close(g.colors, torch.full((3, 3), 0.5))


def test_ray_distance_log_mode() -> None:
    cfg = DecoderConfig.preset("tiny")  # near 0.1, far 20, distance_init 3
    wide = ray_distance(torch.linspace(-30.0, 30.0, 2001), cfg)
    assert bool((wide[1:] >= wide[:-1]).all()) and wide.min() >= 0.1 - 1e-6 and wide.max() <= 20.0 + 1e-5
    t = ray_distance(torch.linspace(-10.0, 10.0, 2001), cfg)
    assert bool((t[1:] > t[:-1]).all())  # strictly increasing until the float32 sigmoid saturates (|delta| ~ 11)
    torch.testing.assert_close(ray_distance(torch.tensor([-1e4, 0.0, 1e4]), cfg), torch.tensor([0.1, 3.0, 20.0]))
    # equal steps of delta near 0 are (nearly) equal ratios of distance: log-linear in the middle of the range
    mid = ray_distance(torch.tensor([-0.1, 0.0, 0.1]), cfg)
    assert abs(math.log(mid[1] / mid[0]) / math.log(mid[2] / mid[1]) - 1) < 0.05
    other = DecoderConfig.preset("tiny", distance_init=7.0)
    torch.testing.assert_close(ray_distance(torch.zeros(1), other), torch.tensor([7.0]))
    # Lyra's linear mode ignores distance_init: zero output lies sigmoid(-1.65) of the way from near to far
    w = 1 / (1 + math.exp(1.65))
    torch.testing.assert_close(ray_distance(torch.zeros(1), LYRA_TINY), torch.tensor([0.1 * (1 - w) + 500.0 * w]))


def test_gaussian_processing_cpu_layout() -> None:
    cfg = DecoderConfig.preset("tiny")
    m = 4
    raw = torch.zeros(m, 12)
    raw[:, 7] = 1.0
    raw[1, 0], raw[2, 0] = -1e4, 1e4  # distance: 3 (zero output), near, far
    raw[3, 4:7] = torch.tensor([math.log(2.0), 0.0, 10.0])  # scale x2, x1, capped
    o = torch.tensor([[1.0, 2.0, 3.0]]).expand(m, 3)
    d = torch.tensor([[0.0, 0.0, 1.0]]).expand(m, 3)
    foot = torch.full((m, 1), 4.0 / 50.0)  # stride 4, fx 50
    base = torch.tensor([[0.2, 0.5, 0.9], [0.0, 1.0, 0.3], [0.7, 0.7, 0.7], [0.1, 0.4, 0.6]])
    g = gaussian_processing(raw, o, d, cfg, base_colors=base, footprint=foot)
    dist = torch.tensor([3.0, 0.1, 20.0, 3.0])
    torch.testing.assert_close(g.means[:, 2], 3.0 + dist)
    # footprint scale = scale_init * (stride / fx) * distance at zero output, times exp(s), capped at scale_cap
    s0 = 0.35 * (4.0 / 50.0) * dist  # 0.084, 0.0028, 0.56 (-> cap 0.3), 0.084
    torch.testing.assert_close(g.scales[:3], s0[:3, None].clamp(max=0.3).expand(3, 3))
    torch.testing.assert_close(g.scales[3], torch.tensor([2 * s0[3], s0[3], 0.3]))
    torch.testing.assert_close(g.opacities, torch.full((m,), 1 / (1 + math.exp(-1.0))))
    # colour skip: a zero head output reproduces the block colours (clamped to [eps, 1 - eps] for the logit)
    torch.testing.assert_close(g.colors, base.clamp(COLOR_SKIP_EPS, 1 - COLOR_SKIP_EPS))
    raw[:, 1:4] = 2.0
    up = gaussian_processing(raw, o, d, cfg, base_colors=base, footprint=foot).colors
    assert bool((up > g.colors).all()) and up.max() < 1
    with pytest.raises(LyraConfigError, match="footprint"):
        gaussian_processing(raw, o, d, cfg, base_colors=base)


def plane_views(cfg: DecoderConfig, v: int = 2, t: int = 9, h: int = 32, w: int = 48, seed: int = 0):
    """``v`` rotated look-at trajectories with random frames and a random (positive) z-depth map."""
    from lyra_ops.trajectories import make_trajectory

    gen = torch.Generator().manual_seed(seed)
    names = ("left", "up", "zoom_in")
    cams = [make_trajectory(names[i], default_intrinsics(h, w), h, w, t, distance=0.3) for i in range(v)]
    frames = [torch.rand(t, 3, h, w, generator=gen) for _ in range(v)]
    depths = [torch.rand(t, 1, h, w, generator=gen) * 4 + 1 for _ in range(v)]
    return cams, frames, depths


@pytest.mark.parametrize("layout", ["cpu", "lyra"])
def test_ceiling_gaussians_sit_at_the_exact_depth(layout: str) -> None:
    cfg = GRID_TINY if layout == "cpu" else LYRA_TINY
    gs, h, w = cfg.gaussian_stride, 32, 48
    frames_out = output_frames(cfg, 2)
    cams, frames, depths = plane_views(cfg, h=h, w=w)
    for plane in (True, False):
        dep = [torch.full_like(d, 2.5) for d in depths] if plane else depths
        g = ceiling_gaussians(cfg, cams, frames, dep)
        assert g.num == 2 * len(frames_out) * (h // gs) * (w // gs)
        means = g.means.reshape(2, len(frames_out), h // gs, w // gs, 3)
        colors = g.colors.reshape(2, len(frames_out), h // gs, w // gs, 3)
        scales = g.scales.reshape(2, len(frames_out), h // gs, w // gs, 3)
        for v in range(2):
            sel = cams[v][torch.tensor(frames_out)]
            cam = torch.einsum("tij,thwj->thwi", sel.w2c[:, :3, :3], means[v]) + sel.w2c[:, None, None, :3, 3]
            # z of every mean in the camera of its frame = the exact depth of its block's centre pixel
            target = dep[v][frames_out][:, 0, gs // 2 :: gs, gs // 2 :: gs]
            torch.testing.assert_close(cam[..., 2], target, atol=1e-5, rtol=1e-5)
            # and it projects onto its block's centre
            uv = torch.einsum("tij,thwj->thwi", sel.K, cam)
            u, vv = uv[..., 0] / uv[..., 2], uv[..., 1] / uv[..., 2]
            torch.testing.assert_close(u[0, 0], torch.arange(w // gs) * gs + gs / 2.0, atol=1e-3, rtol=0)
            torch.testing.assert_close(vv[0, :, 0], torch.arange(h // gs) * gs + gs / 2.0, atol=1e-3, rtol=0)
            # colours = block means of the frame
            blocks = torch.nn.functional.avg_pool2d(frames[v][frames_out], gs).permute(0, 2, 3, 1)
            torch.testing.assert_close(colors[v], blocks)
            # isotropic, at the head's zero-output scale
            distance = (means[v] - sel.c2w[:, None, None, :3, 3]).norm(dim=-1)
            if cfg.scale_param == "footprint":
                expected = (0.35 * gs / sel.K[:, 0, 0, None, None] * distance).clamp(max=0.3)
            else:
                expected = torch.full_like(distance, 0.3 / math.e)
            torch.testing.assert_close(scales[v], expected[..., None].expand_as(scales[v]), atol=1e-6, rtol=1e-5)
        assert torch.allclose(g.opacities, torch.full((g.num,), 0.99))
        torch.testing.assert_close(g.quats, torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(g.num, 4))


def test_pruning_keeps_most_opaque(inputs) -> None:
    latents, plucker, cams = inputs
    full = LatentGaussianDecoder(DecoderConfig.preset("tiny"), seed=0)
    pruned = LatentGaussianDecoder(DecoderConfig.preset("tiny", prune_ratio=0.8), seed=0)
    with torch.no_grad():
        g, p = full(latents, plucker, cams), pruned(latents, plucker, cams)
    assert p.num == math.floor(g.num * 0.2)
    torch.testing.assert_close(p.opacities, g.opacities.sort(descending=True).values[: p.num])


# --- construction, gradients, training ----------------------------------------------------------------------


def test_deterministic_construction_without_touching_global_rng() -> None:
    state = torch.get_rng_state()
    a = LatentGaussianDecoder(DecoderConfig.preset("tiny"), seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = LatentGaussianDecoder(DecoderConfig.preset("tiny"), seed=3)
    c = LatentGaussianDecoder(DecoderConfig.preset("tiny"), seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.qkv.weight"], sc["blocks.0.attn.qkv.weight"])
    # spec 4.5 initialisation
    assert a.plucker_embed.proj.weight.abs().max() == 0 and a.plucker_embed.proj.bias.abs().max() == 0
    assert a.blocks[0].attn.qkv.bias.abs().max() == 0
    assert abs(a.blocks[0].mlp.fc1.weight.std().item() - 0.02) < 0.002  # trunc-normal std 0.02 (cut at +-2)
    w = a.latent_embed.proj.weight
    assert abs(w.std().item() - math.sqrt(2 / (4 * 64))) < 0.01


def test_gradients_reach_every_parameter_but_the_plucker_layernorm_gain(inputs) -> None:
    """Zero-init Plücker conv -> LayerNorm sees a constant vector -> its normalised output is 0, so the LN gain
    gets no gradient at init; the zero conv itself does (through the LN's 1/sqrt(eps) slope)."""
    latents, plucker, cams = inputs
    model = LatentGaussianDecoder(DecoderConfig.preset("tiny"), seed=0)
    g = model(latents, plucker, cams)
    (g.means.sum() * 1e-3 + g.colors.sum() + g.opacities.sum() + g.scales.sum() + (g.quats * 0.3).sum()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert no_grad == ["plucker_embed.norm.weight"]
    assert model.plucker_embed.proj.weight.grad.abs().max() > 0


def test_gradient_checkpointing_matches(inputs) -> None:
    latents, plucker, _ = inputs
    grads = []
    for ckpt in (False, True):
        model = LatentGaussianDecoder(DecoderConfig.preset("tiny", gradient_checkpointing=ckpt), seed=1)
        model.forward_raw(latents, plucker).square().mean().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_three_step_overfit_lowers_mse() -> None:
    latents, plucker, cams = make_inputs(v=1, t=9, h=32, w=48, seed=2)
    model = LatentGaussianDecoder(DecoderConfig.preset("tiny"), seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    target_cams = cams[0][torch.tensor([0, 8])]
    target = torch.full((2, 3, 32, 48), 0.3)
    losses = []
    for _ in range(4):
        g = model(latents, plucker, cams)
        render = rasterize(
            g, target_cams.w2c, target_cams.K, 48, 32, background=torch.ones(3), backend="torch", near=0.1, far=500.0
        )
        total, parts = distillation_loss(render, target)
        losses.append(parts["mse"].item())
        opt.zero_grad()
        total.backward()
        opt.step()
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.98 * losses[0], losses


# --- validation ----------------------------------------------------------------------------------------------


def test_input_validation(tiny: LatentGaussianDecoder, inputs) -> None:
    latents, plucker, cams = inputs
    with pytest.raises(LyraConfigError, match=r"latents: expected 1536 channels.*\(2, 16, 2, 8, 12\)"):
        tiny.forward_raw(latents[:, :16], plucker)
    with pytest.raises(LyraConfigError, match="plucker: expected 48 channels"):
        tiny.forward_raw(latents, plucker[:, :32])
    with pytest.raises(LyraConfigError, match=r"to match latents .* found \(2, 48, 1, 8, 12\)"):
        tiny.forward_raw(latents, plucker[:, :, :1])
    with pytest.raises(LyraConfigError, match="expected 9 cameras"):
        tiny(latents, plucker, [c[:5] for c in cams])
    with pytest.raises(LyraConfigError, match="one per view"):
        tiny(latents, plucker, cams[:1])
    # an odd latent grid (e.g. 88 x 160 frames -> 11 x 20) cannot be tiled by the 2x2 patch
    with pytest.raises(LyraConfigError, match="multiples of 16"):
        tiny.forward_raw(latents[:, :, :, :7], plucker[:, :, :, :7])


def test_load_state_of_another_preset_names_key_and_shapes(tiny: LatentGaussianDecoder) -> None:
    other = LatentGaussianDecoder(DecoderConfig.preset("tiny"), seed=9)
    load_decoder_state(tiny.__class__(tiny.config, seed=5), other.state_dict())  # same preset: loads
    small = LatentGaussianDecoder(DecoderConfig.preset("small"), seed=0)
    with pytest.raises(
        LyraConfigError,
        match=r"'latent_embed.proj.weight' expects shape \(64, 1536, 1, 2, 2\) but "
        r"the checkpoint has \(192, 1536, 1, 2, 2\)",
    ) as info:
        load_decoder_state(LatentGaussianDecoder(DecoderConfig.preset("tiny")), small.state_dict())
    assert "unexpected keys" in str(info.value) and "blocks.2." in str(info.value)
    paper_channels = LatentGaussianDecoder(
        DecoderConfig.preset("tiny", latent_channels=16, plucker_channels=32, color_skip=False)
    )
    with pytest.raises(LyraConfigError, match=r"\(64, 1536, 1, 2, 2\) but the checkpoint has \(64, 16, 1, 2, 2\)"):
        load_decoder_state(LatentGaussianDecoder(DecoderConfig.preset("tiny")), paper_channels.state_dict())


def test_mamba_fallback_warns_and_builds_attention(monkeypatch, caplog) -> None:
    monkeypatch.setattr(decoder_mod, "mamba2_available", lambda: False)
    cfg = DecoderConfig(width=32, depth=2, heads=2, block_types=(MAMBA2, ATTENTION))
    with caplog.at_level(logging.WARNING, logger="lyra_ops.decoder"):
        model = LatentGaussianDecoder(cfg)
    assert model.block_types == (ATTENTION, ATTENTION)
    assert all(isinstance(b, decoder_mod.TransformerBlock) for b in model.blocks)
    messages = [r.getMessage() for r in caplog.records if r.name == "lyra_ops.decoder"]
    assert len(messages) == 1
    assert "Mamba-2 unavailable" in messages[0] and "falling back to attention blocks for 1 of 2" in messages[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lyra_ops.decoder"):
        LatentGaussianDecoder(DecoderConfig.preset("tiny"))
    assert not caplog.records


# --- known depth (depth_input) ---------------------------------------------------------------------------------


def test_ray_distance_takes_a_known_base_as_its_zero_point() -> None:
    cfg = DecoderConfig.preset("tiny")
    base = torch.tensor([[0.0], [0.5], [2.0], [7.5], [50.0]])
    dist = ray_distance(torch.zeros(5, 1), cfg, base)
    # far: clamped just inside
    torch.testing.assert_close(dist[:, 0], torch.tensor([3.0, 0.5, 2.0, 7.5, 20.0]), atol=1e-3, rtol=1e-3)
    # equal steps of delta are still (nearly) equal ratios around the known base
    up = ray_distance(torch.full((5, 1), 0.1), cfg, base)
    assert (up > dist).all()
    with pytest.raises(LyraConfigError, match="log"):
        ray_distance(torch.zeros(1, 1), LYRA_TINY, torch.ones(1, 1))


def test_block_distance_puts_known_blocks_on_the_depth_and_leaves_edges_unknown() -> None:
    cfg = DecoderConfig.preset("tiny")
    t, h, w = 9, 32, 48
    cams = trajectory(t, h, w, 0.0)
    depth = torch.full((t, 1, h, w), 2.5)
    depth[8, 0, 4:8, 8:12] = 0.0  # frame 8, block (1, 2): unknown
    depth[0, 0, 8:12, 9:10] = 5.0  # frame 0, block (2, 2): the central pixels straddle an edge
    _, origins, dirs, _ = output_rays(cfg, cams)
    dist = block_distance(depth, cams, dirs, cfg)
    assert dist.shape == (2, h // 4, w // 4, 1)
    z = (dist * dirs)[..., 2]  # cameras look down +z from z = 0
    known = dist[..., 0] > 0
    torch.testing.assert_close(z[known], torch.full_like(z[known], 2.5))
    assert not known[1, 1, 2] and not known[0, 2, 2] and int((~known).sum()) == 2


def test_depth_input_starts_from_the_model_without_it(inputs) -> None:
    """The depth embedding is zero at init: weights trained without depth_input load (keep_missing) and give
    the same Gaussians when nothing is known; with known depth, a zero distance output sits on that depth."""
    latents, plucker, cams = inputs
    plain = LatentGaussianDecoder(replace(GRID_TINY, depth_input=False), seed=3)
    model = LatentGaussianDecoder(GRID_TINY, seed=0)
    with pytest.raises(LyraConfigError, match="missing keys"):
        load_decoder_state(model, plain.state_dict())
    load_decoder_state(model, plain.state_dict(), keep_missing=("depth_embed.",))
    assert model.depth_embed.proj.weight.abs().max() == 0
    with torch.no_grad():
        a, b = plain(latents, plucker, cams), model(latents, plucker, cams)
        torch.testing.assert_close(a.means, b.means)
        torch.testing.assert_close(a.colors, b.colors)
        model.head.weight[:, 0].zero_()
        model.head.bias[0] = 0.0
        known = torch.full((2, 9, 1, 64, 96), 2.0)
        g = model(latents, plucker, cams, known_depth=known)
    origins, dirs, _ = model.rays(cams, torch.device("cpu"))
    z = ((g.means - origins.reshape(-1, 3)) * torch.tensor([0.0, 0.0, 1.0])).sum(-1)
    torch.testing.assert_close(z, torch.full_like(z, 2.0), atol=1e-4, rtol=1e-4)
    with pytest.raises(LyraConfigError, match="known_depth"):
        model(latents, plucker, cams, known_depth=torch.ones(2, 9, 1, 32, 48))
    # the known depth reaches the trunk: a trained (non-zero) embedding changes the raw output
    with torch.no_grad():
        model.depth_embed.proj.weight.normal_(0, 0.01)
        other = model(latents, plucker, cams, known_depth=known * 1.5)
    assert not torch.allclose(other.colors, g.colors)


def test_background_and_depth_input_config_errors_name_the_field() -> None:
    with pytest.raises(LyraConfigError, match=r"decoder\.background: expected one of .*'black'"):
        DecoderConfig.preset("tiny", background="black")
    with pytest.raises(LyraConfigError, match=r"decoder\.depth_input: expected False unless distance_param is 'log'"):
        DecoderConfig.preset("tiny", distance_param="linear")
    with pytest.raises(LyraConfigError, match=r"decoder\.depth_input: expected true or false"):
        DecoderConfig.preset("tiny", depth_input="yes")
    assert DecoderConfig().background == "white" and not DecoderConfig().depth_input  # Lyra's (paper) defaults


def test_fused_keep_draws_what_the_input_saw_once() -> None:
    """``fuse: known``: the input frame keeps its whole grid; later frames (and other views' first frames, the
    same input camera) keep only blocks the known input depth does not fully cover; ``stack`` keeps everything."""
    cfg = DecoderConfig.preset("tiny", fuse="known", input_stride=0, fuse_covered=1.0)
    v, t, h, w, g = 2, 9, 32, 48, cfg.gaussian_stride
    known = torch.full((v, t, 1, h, w), 2.0)
    known[0, 8, 0, :8, :8] = 0.0  # view 0, frame 8: blocks (0..1, 0..1) unseen
    known[1, 8, 0, 4, 4] = 0.0  # view 1, frame 8: one pixel of block (1, 1) unseen
    known[1, 0, 0, 0, 0] = 0.0  # view 1, frame 0 (the input camera again): one pixel of block (0, 0) unseen
    keep = fused_keep(cfg, known).reshape(v, 2, h // g, w // g)
    assert keep[0, 0].all()
    expected = torch.zeros(v, 2, h // g, w // g, dtype=torch.bool)
    expected[0, 0] = True
    expected[0, 1, :2, :2] = True
    expected[1, 1, 1, 1] = True
    expected[1, 0, 0, 0] = True
    assert torch.equal(keep, expected)
    # a block counts as covered from fuse_covered of its pixels known
    half = fused_keep(replace(cfg, fuse_covered=0.5), known).reshape(keep.shape)
    assert not half[1, 1, 1, 1] and not half[1, 0, 0, 0] and half[0, 1, :2, :2].all()
    # the CPU presets' 0.05: any known pixel makes the block seen; only blocks the input saw nothing of remain
    preset = fused_keep(replace(cfg, fuse_covered=0.05), known).reshape(keep.shape)
    assert preset[0, 0].all() and int(preset[0, 1].sum()) == 4 and not preset[1].any()
    # with the input head, the input frame's grid is dropped and the head's Gaussians come first
    with_head = fused_keep(DecoderConfig.preset("tiny"), known)
    assert with_head.shape == (h * w + keep.numel(),) and with_head[: h * w].all()
    assert torch.equal(with_head[h * w :].reshape(keep.shape)[0, 0], torch.zeros_like(keep[0, 0]))
    assert torch.equal(with_head[h * w :].reshape(keep.shape)[:, 1], preset[:, 1])
    with pytest.raises(LyraConfigError, match=r"decoder\.fuse: expected 'stack' unless depth_input"):
        DecoderConfig.preset("tiny", fuse="known", input_stride=0, depth_input=False)
    with pytest.raises(LyraConfigError, match=r"decoder\.input_stride: expected 0 unless fuse is 'known'"):
        DecoderConfig.preset("tiny", fuse="stack")
    with pytest.raises(LyraConfigError, match=r"decoder\.input_stride: expected 0 \(off\) or a positive int"):
        DecoderConfig.preset("tiny", input_stride=3)
    with pytest.raises(LyraConfigError, match=r"decoder\.fuse_covered"):
        DecoderConfig.preset("tiny", fuse="known", fuse_covered=0.0)


def test_model_and_ceiling_fuse_the_same_gaussians(inputs) -> None:
    latents, plucker, cams = inputs
    stack = LatentGaussianDecoder(DecoderConfig.preset("tiny", fuse="stack", input_stride=0), seed=0)
    fused = LatentGaussianDecoder(DecoderConfig.preset("tiny", input_stride=0), seed=0)
    known = torch.full((2, 9, 1, 64, 96), 2.0)
    known[1, 8, 0, 16:32, 32:48] = 0.0  # 4 x 4 blocks of view 1's last frame unseen
    with torch.no_grad():
        full = stack(latents, plucker, cams, known_depth=known)
        grid = fused(latents, plucker, cams, known_depth=known, prune=False)
        kept = fused(latents, plucker, cams, known_depth=known)
        unknown = fused(latents, plucker, cams)  # nothing known: nothing to fuse
    per_frame = (64 // 4) * (96 // 4)
    assert grid.num == full.num == unknown.num == 4 * per_frame and kept.num == per_frame + 16
    keep = fused_keep(fused.config, known)
    torch.testing.assert_close(kept.means, grid.means[keep])
    torch.testing.assert_close(kept.means[:per_frame], full.means[:per_frame])
    frames = [torch.rand(9, 3, 64, 96) for _ in range(2)]
    depth = [torch.full((9, 1, 64, 96), 2.0) for _ in range(2)]
    ceiling = ceiling_gaussians(fused.config, cams, frames, depth, known_depth_per_view=list(known))
    assert ceiling.num == kept.num


def test_input_head_starts_as_the_input_frame_unprojected(inputs) -> None:
    """``input_stride`` 1: one Gaussian per input pixel, first in the output, from a new head; a zero head output
    puts each on its pixel's known depth with its pixel's colour, ``input_scale_init`` of a pixel wide and
    ``input_opacity_init`` opaque (the RGB-D unprojection baseline); weights without the head load into it."""
    latents, plucker, cams = inputs
    cfg = DecoderConfig.preset("tiny")
    model = LatentGaussianDecoder(cfg, seed=0)
    h, w = 64, 96
    known = torch.rand(2, 9, 1, h, w) * 3 + 1
    known[1, 8, 0, 4:8, 4:8] = 0.0  # one 4x4 block of view 1's last frame unseen by the input
    with torch.no_grad():
        model.input_head.weight.zero_()
        model.input_head.bias[:-1] = 0.0
        model.input_head.bias[7] = 1.0  # identity rotation
        g = model(latents, plucker, cams, known_depth=known)
    assert g.num == h * w + 1  # the input frame, plus the one Gaussian of the block it did not see
    first = g.index(torch.arange(h * w))
    cam = cams[0]
    z = (first.means - cam.c2w[0, :3, 3]) @ cam.c2w[0, :3, 2]
    torch.testing.assert_close(z, known[0, 0, 0].reshape(-1), atol=1e-4, rtol=1e-4)
    pixels = PixelPatchifyEncoder().decode(latents[0])[0].permute(1, 2, 0).reshape(-1, 3) * 0.5 + 0.5
    torch.testing.assert_close(first.colors, pixels.clamp(COLOR_SKIP_EPS, 1 - COLOR_SKIP_EPS), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(first.opacities, torch.full((h * w,), cfg.input_opacity_init))
    fx = float(cam.K[0, 0, 0])
    distance = (first.means - cam.c2w[0, :3, 3]).norm(dim=-1)
    torch.testing.assert_close(first.scales[:, 0], cfg.input_scale_init / fx * distance)
    # the ceiling of this layout has the same Gaussians, in the same order
    frames = [torch.rand(9, 3, h, w) for _ in range(2)]
    ceiling = ceiling_gaussians(cfg, cams, frames, list(known), known_depth_per_view=list(known))
    assert ceiling.num == g.num
    torch.testing.assert_close(ceiling.means[: h * w], first.means, atol=1e-4, rtol=1e-4)
    # a checkpoint from before the input head loads with it kept (NEW_MODULES)
    old = LatentGaussianDecoder(DecoderConfig.preset("tiny", fuse="stack", input_stride=0), seed=1)
    load_decoder_state(model, old.state_dict(), keep_missing=("input_head.",))
    torch.testing.assert_close(model.head.weight, old.head.weight)


def known_with_an_edge_and_its_unprojection(latents, plucker, cams, h: int, w: int):
    """Known depth (2,9,1,h,w) with a depth edge the reliability filter left unknown in the input frame, and the
    input head's Gaussians at its zero point (the RGB-D unprojection, of the filled depth at the edge)."""
    known = torch.rand(2, 9, 1, h, w) * 3 + 1
    known[0, 0, 0, 10:12, 20:30] = 0.0
    ref = at_zero_point(LatentGaussianDecoder(DecoderConfig.preset("tiny"), seed=0))
    with torch.no_grad():
        return known, ref(latents, plucker, cams, known_depth=known).index(torch.arange(h * w))


def at_zero_point(model: LatentGaussianDecoder) -> LatentGaussianDecoder:
    """``model`` with its input head at the zero point: no residuals, identity rotation, the opacity bias as
    initialised (``input_opacity_init``)."""
    with torch.no_grad():
        model.input_head.weight.zero_()
        model.input_head.bias[:-1] = 0.0
        model.input_head.bias[7] = 1.0
    return model


def test_input_edge_depth_input_starts_unknown_pixels_on_the_input_depth(inputs) -> None:
    """``input_edge_depth: input``: the input head's Gaussians at pixels the known depth leaves out start on the
    input frame's own depth there (its RGB-D unprojection), not on the surface behind; elsewhere nothing changes
    (the tokens still see those pixels as unknown). Without ``input_depth`` it decodes as ``fill``."""
    from lyra_ops.baselines import rgbd_gaussians

    latents, plucker, cams = inputs
    h, w = 64, 96
    known, filled = known_with_an_edge_and_its_unprojection(latents, plucker, cams, h, w)
    own = known[0, 0, 0].clone()
    own[10:12, 20:30] = 0.5  # the depth stage's depth at the edge: in front of the surface the fill puts there
    model = at_zero_point(LatentGaussianDecoder(DecoderConfig.preset("tiny", input_edge_depth="input"), seed=0))
    with torch.no_grad():
        g = model(latents, plucker, cams, known_depth=known, input_depth=own).index(torch.arange(h * w))
        as_fill = model(latents, plucker, cams, known_depth=known).index(torch.arange(h * w))
    edge = known[0, 0, 0].reshape(-1) == 0
    rgbd = rgbd_gaussians(torch.rand(3, h, w), own, cams[0].K[0], cams[0].c2w[0])
    torch.testing.assert_close(g.means[edge], rgbd.means[edge], rtol=1e-4, atol=1e-5)
    assert float((filled.means[edge] - rgbd.means[edge]).norm(dim=1).min()) > 0.1  # fill put them elsewhere
    for name in ("means", "scales", "colors", "opacities"):
        torch.testing.assert_close(getattr(g, name)[~edge], getattr(filled, name)[~edge])
        torch.testing.assert_close(getattr(as_fill, name), getattr(filled, name))
    with pytest.raises(LyraConfigError, match="input_depth"):
        model(latents, plucker, cams, known_depth=known, input_depth=own[:-1])
    with pytest.raises(LyraConfigError, match="input_edge_depth"):
        DecoderConfig.preset("tiny", input_edge_depth="exact")
    with pytest.raises(LyraConfigError, match="input_edge_depth"):
        DecoderConfig.preset("tiny", input_edge_depth="input", input_stride=0, fuse="stack")


def test_input_fit_solves_the_input_heads_colours_against_the_input_image(inputs) -> None:
    """``input_fit_iters``: given the input image, the input head's colours are solved so the render at the input
    camera reproduces it (closer than decoded); the other Gaussians and every other field are untouched, and
    neither the whole output (``prune=False``, what training reads) nor a decoding without the image changes."""
    latents, plucker, cams = inputs
    h, w = 64, 96
    known = torch.rand(2, 9, 1, h, w) * 3 + 1
    image = torch.rand(3, h, w)
    plain = LatentGaussianDecoder(DecoderConfig.preset("tiny"), seed=0).eval()
    fitted = with_render(plain, input_fit_iters=8, input_fit_ridge=0.1)
    with torch.no_grad():
        before = plain(latents, plucker, cams, known_depth=known)
        after = fitted(latents, plucker, cams, known_depth=known, input_image=image)
        no_image = fitted(latents, plucker, cams, known_depth=known)
        whole = [m(latents, plucker, cams, known_depth=known, input_image=image, prune=False) for m in (plain, fitted)]
    head = torch.arange(after.num) < h * w
    assert float((after.colors[head] - before.colors[head]).abs().max()) > 0.01
    # (two forward passes may differ in the last bit: CPU kernels' reduction order is not fixed between calls)
    torch.testing.assert_close(after.colors[~head], before.colors[~head])
    for name in ("means", "scales", "quats", "opacities"):
        torch.testing.assert_close(getattr(after, name), getattr(before, name))
    torch.testing.assert_close(no_image.colors, before.colors)
    torch.testing.assert_close(whole[1].colors, whole[0].colors)
    bg = image.mean(dim=(1, 2))  # the tiny preset composites over the input's mean colour

    def error(g) -> float:
        out = rasterize(g, cams[0].w2c[:1], cams[0].K[:1], w, h, background=bg)
        return float(((out.rgb[0] - image) ** 2).mean())

    assert error(after) < 0.8 * error(before)
    with pytest.raises(LyraConfigError, match="input_image"):
        fitted(latents, plucker, cams, known_depth=known, input_image=image[:, :-1])
    with pytest.raises(LyraConfigError, match="input_fit_iters"):
        DecoderConfig.preset("tiny", input_fit_iters=-1)
    with pytest.raises(LyraConfigError, match="input_fit_ridge"):
        DecoderConfig.preset("tiny", input_fit_ridge=float("nan"))
    with pytest.raises(LyraConfigError, match="input_fit_iters"):
        DecoderConfig.preset("tiny", input_fit_iters=4, input_stride=0, fuse="stack")


def test_input_footprint_depth_makes_the_zero_point_the_rgbd_scale(inputs) -> None:
    """``input_footprint: depth``: at its zero output the input head's Gaussians have the RGB-D unprojection's
    scale, input_scale_init x z / fx at every pixel; ``ray`` (the default) is that / cos of the ray's angle."""
    from lyra_ops.baselines import rgbd_gaussians

    latents, plucker, cams = inputs
    h, w = 64, 96
    known, ray = known_with_an_edge_and_its_unprojection(latents, plucker, cams, h, w)
    model = at_zero_point(LatentGaussianDecoder(DecoderConfig.preset("tiny", input_footprint="depth"), seed=0))
    with torch.no_grad():
        g = model(latents, plucker, cams, known_depth=known).index(torch.arange(h * w))
    on = known[0, 0, 0].reshape(-1) > 0
    rgbd = rgbd_gaussians(torch.rand(3, h, w), known[0, 0, 0], cams[0].K[0], cams[0].c2w[0])
    torch.testing.assert_close(g.scales[on], rgbd.scales, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g.means, ray.means)
    cos = g.scales[:, 0] / ray.scales[:, 0]
    assert float(cos.min()) < 0.95 and float(cos.max()) <= 1.0 + 1e-6  # the corners: smaller by their cosine
    with pytest.raises(LyraConfigError, match="input_footprint"):
        DecoderConfig.preset("tiny", input_footprint="pixel")


def test_input_gate_pins_known_pixels_to_the_rgbd_unprojection(inputs) -> None:
    """``input_gate``: where the input frame's depth is known, the gated channel groups of the input head take the
    RGB-D unprojection's values whatever the head outputs; unknown pixels (depth edges) stay learned."""
    latents, plucker, cams = inputs
    h, w = 64, 96
    known, exact = known_with_an_edge_and_its_unprojection(latents, plucker, cams, h, w)
    gated = LatentGaussianDecoder(DecoderConfig.preset("tiny", input_gate=("distance", "rgb", "scale", "quat",
                                                                           "opacity")), seed=0)
    with torch.no_grad():
        gated.input_head.bias.normal_()  # a head far from its zero point
        free = LatentGaussianDecoder(DecoderConfig.preset("tiny"), seed=0)
        free.load_state_dict(gated.state_dict())
        g = gated(latents, plucker, cams, known_depth=known).index(torch.arange(h * w))
        f = free(latents, plucker, cams, known_depth=known).index(torch.arange(h * w))
    on = known[0, 0, 0].reshape(-1) > 0
    for name in ("means", "scales", "opacities", "colors"):
        torch.testing.assert_close(getattr(g, name)[on], getattr(exact, name)[on], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(getattr(g, name)[~on], getattr(f, name)[~on])
    assert not torch.allclose(f.colors[on], exact.colors[on])  # ungated, the same head moves them
    only_colour = LatentGaussianDecoder(DecoderConfig.preset("tiny", input_gate=("rgb",)), seed=0)
    only_colour.load_state_dict(gated.state_dict())
    with torch.no_grad():
        c = only_colour(latents, plucker, cams, known_depth=known).index(torch.arange(h * w))
    torch.testing.assert_close(c.colors[on], exact.colors[on], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(c.means, f.means)
    with pytest.raises(LyraConfigError, match="input_gate"):
        DecoderConfig.preset("tiny", input_gate=("colour",))
    with pytest.raises(LyraConfigError, match="input_gate"):
        DecoderConfig.preset("paper", input_gate=("rgb",))


def test_input_edges_rgbd_pins_only_the_unknown_pixels(inputs) -> None:
    """``input_edges: rgbd``: at input pixels without a known depth (a depth edge) but with a filled one, the head
    gives the RGB-D unprojection of the filled depth; known pixels keep the learned output."""
    latents, plucker, cams = inputs
    h, w = 64, 96
    known, exact = known_with_an_edge_and_its_unprojection(latents, plucker, cams, h, w)
    edges = LatentGaussianDecoder(DecoderConfig.preset("tiny", input_edges="rgbd"), seed=0)
    with torch.no_grad():
        edges.input_head.bias.normal_()
        free = LatentGaussianDecoder(DecoderConfig.preset("tiny"), seed=0)
        free.load_state_dict(edges.state_dict())
        g = edges(latents, plucker, cams, known_depth=known).index(torch.arange(h * w))
        f = free(latents, plucker, cams, known_depth=known).index(torch.arange(h * w))
    unknown = known[0, 0, 0].reshape(-1) <= 0
    for name in ("means", "scales", "opacities", "colors"):
        torch.testing.assert_close(getattr(g, name)[unknown], getattr(exact, name)[unknown], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(getattr(g, name)[~unknown], getattr(f, name)[~unknown])
    assert not torch.allclose(f.means[unknown], exact.means[unknown])
    with pytest.raises(LyraConfigError, match="input_edges"):
        DecoderConfig.preset("tiny", input_edges="exact")
    with pytest.raises(LyraConfigError, match="input_guard"):
        DecoderConfig.preset("tiny", input_guard=-0.1)


def _guard_scene(seed: int = 3, n: int = 1200):
    """A random camera (20x30 px) with a random depth map (an unknown patch) and points in and around its frame."""
    gen = torch.Generator().manual_seed(seed)
    h, w = 20, 30
    K = torch.tensor([[25.0, 0, 15.0], [0, 25.0, 10.0], [0, 0, 1]])
    c2w = torch.eye(4)
    c2w[:3, :3] = torch.linalg.qr(torch.randn(3, 3, generator=gen))[0]
    if torch.det(c2w[:3, :3]) < 0:
        c2w[:3, 0] *= -1
    c2w[:3, 3] = torch.randn(3, generator=gen)
    depth = torch.rand(h, w, generator=gen) * 2 + 1
    depth[3:5, 4:9] = 0.0  # unknown: never counts
    local = torch.stack([(torch.rand(n, generator=gen) * 50 - 10 - 15) / 25,
                         (torch.rand(n, generator=gen) * 40 - 10 - 10) / 25, torch.ones(n)], -1)
    z = torch.rand(n, generator=gen) * 4 + 0.2
    local = local * z[:, None]
    local[:20, 2] *= -1  # behind the camera
    means = local @ c2w[:3, :3].T + c2w[:3, 3]
    scales = torch.rand(n, 3, generator=gen) * 0.05
    return means, scales, K, c2w, depth, local


def _brute_clearance(local: torch.Tensor, depth: torch.Tensor, ratio: float) -> list[float]:
    """Distance from each point's pixel to the nearest pixel it lies in front of (z < ratio x depth), by loops."""
    h, w = depth.shape
    out = []
    for x, y, zz in local.tolist():
        if zz <= 0:
            out.append(math.inf)
            continue
        iu, iv = math.floor(25 * x / zz + 15), math.floor(10 + 25 * y / zz)
        best = math.inf
        for r in range(h):
            for c in range(w):
                d = float(depth[r, c])
                if d > 0 and zz < ratio * d:
                    best = min(best, math.hypot(r - iv, c - iu))
        out.append(best)
    return out


def test_input_view_clearance_brackets_a_brute_force_reference() -> None:
    """0 exactly where the point's own pixel is covered (z < (1 + tol) x its depth); elsewhere between the exact
    distance at the depth rounded one level step stricter and the exact distance at (1 + tol); inf behind the camera
    and behind everything the camera saw."""
    from lyra_ops.decoder import input_view_clearance

    means, _, K, c2w, depth, local = _guard_scene()
    tol, levels = 0.1, 8
    clear = input_view_clearance(means, K, c2w, depth, tol, reach=torch.full((len(means),), 40.0), levels=levels)
    known = depth[depth > 0]
    step = float(known.max() / known.min()) ** (1 / (levels - 1))
    exact = torch.tensor(_brute_clearance(local, depth, 1 + tol), dtype=torch.float64)
    strict = torch.tensor(_brute_clearance(local, depth, (1 + tol) * step * (1 + 1e-9)), dtype=torch.float64)
    zero = exact == 0
    assert torch.equal(clear == 0, zero) and 0 < int(zero.sum()) < len(means)
    assert bool((clear[local[:, 2] <= 0] == math.inf).all())
    far = torch.isinf(exact) & (local[:, 2] > 0)
    assert bool(far.any()) and bool(torch.isinf(clear[far]).all())
    rest = ~zero & torch.isfinite(exact)
    assert bool((clear[rest] <= exact[rest] + 1e-9).all())
    assert bool((clear[rest] >= torch.where(strict[rest] == 0, 0.5, strict[rest]) - 1e-9).all())
    assert float((clear[rest] - exact[rest]).abs().max()) > 0  # the rounding is visible, the bracket not trivial


def test_input_view_guard_drops_centres_and_shrinks_footprints() -> None:
    """Dropped: centre pixel covered (as the clearance's 0). Kept ones reaching, within k projected sigmas, a pixel
    they cover are shrunk to stop there (shrink = clearance / (k sigma)); k = 0 shrinks nothing."""
    from lyra_ops.decoder import input_view_clearance, input_view_guard

    means, scales, K, c2w, depth, local = _guard_scene(seed=5)
    keep0, shrink0 = input_view_guard(means, scales, K, c2w, depth, tol=0.1)
    keep, shrink = input_view_guard(means, scales, K, c2w, depth, tol=0.1, sigmas=2.0)
    spread = 2.0 * scales.amax(-1).double() * 25 / local[:, 2].double().clamp(min=1e-9)
    clear = input_view_clearance(means, K, c2w, depth, 0.1, reach=spread)
    assert torch.equal(keep, keep0) and torch.equal(keep, clear > 0)
    assert bool((shrink0 == 1).all())
    expect = torch.where(keep & (spread > clear), clear / spread, torch.ones_like(clear)).float()
    torch.testing.assert_close(shrink, expect)
    assert 0 < int((shrink[keep] < 1).sum()) < int(keep.sum())
    with pytest.raises(LyraConfigError, match="input_guard_sigmas"):
        DecoderConfig.preset("tiny", input_guard_sigmas=2.0)  # needs input_guard


def test_input_guard_drops_teacher_gaussians_only(inputs) -> None:
    """``input_guard`` keeps every input-head Gaussian and drops only teacher-frame ones: what the plain fuse keeps
    minus those :func:`input_view_guard` drops against the input's filled known depth."""
    from lyra_ops.decoder import input_count, input_view_guard

    latents, plucker, cams = inputs
    h, w = 64, 96
    known = torch.rand(2, 9, 1, h, w) * 3 + 1
    known[:, 1:] = 0.0  # the later frames see what the input did not: the fuse keeps their Gaussians
    known[1] = 0.0
    plain = LatentGaussianDecoder(DecoderConfig.preset("tiny"), seed=0)
    guarded = LatentGaussianDecoder(DecoderConfig.preset("tiny", input_guard=0.5), seed=0)
    guarded.load_state_dict(plain.state_dict())
    with torch.no_grad():
        a = plain(latents, plucker, cams, known_depth=known)
        b = guarded(latents, plucker, cams, known_depth=known)
    head = input_count(plain.config, h, w)
    torch.testing.assert_close(b.means[:head], a.means[:head])
    rest = a.index(torch.arange(a.num) >= head)
    keep, shrink = input_view_guard(rest.means, rest.scales, cams[0].K[0], cams[0].c2w[0], known[0, 0, 0], 0.5)
    assert b.num == head + int(keep.sum()) and head < b.num < a.num and bool((shrink == 1).all())
    torch.testing.assert_close(b.means[head:], rest.means[keep])
    torch.testing.assert_close(b.scales[head:], rest.scales[keep])
    shrinking = LatentGaussianDecoder(DecoderConfig.preset("tiny", input_guard=0.5, input_guard_sigmas=2.0), seed=0)
    shrinking.load_state_dict(plain.state_dict())
    with torch.no_grad():
        c = shrinking(latents, plucker, cams, known_depth=known)
    keep2, shrink2 = input_view_guard(rest.means, rest.scales, cams[0].K[0], cams[0].c2w[0], known[0, 0, 0], 0.5, 2.0)
    assert torch.equal(keep2, keep) and bool((shrink2 < 1).any())
    torch.testing.assert_close(c.means, b.means)
    torch.testing.assert_close(c.scales[head:], (rest.scales * shrink2[:, None])[keep])
