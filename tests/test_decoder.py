"""LatentGaussianDecoder: config presets, shapes, activations, determinism, gradients, overfit, checkpoints."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import lyra_ops.decoder as decoder_mod
from lyra_ops.cameras import Cameras, default_intrinsics
from lyra_ops.decoder import (
    ATTENTION,
    MAMBA2,
    DecoderConfig,
    LatentGaussianDecoder,
    gaussian_processing,
    load_decoder_state,
    lyra_block_pattern,
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


@pytest.fixture(scope="module")
def tiny() -> LatentGaussianDecoder:
    return LatentGaussianDecoder(DecoderConfig.preset("tiny"), seed=0)


# --- config -------------------------------------------------------------------------------------------------


def test_presets_and_config_round_trip() -> None:
    paper = DecoderConfig.preset("paper")
    assert (paper.width, paper.depth, paper.heads, paper.patch_size) == (512, 16, 8, (1, 2, 2))
    assert paper.block_types == lyra_block_pattern(16)
    assert paper.block_types == ((MAMBA2,) * 7 + (ATTENTION,)) * 2
    assert (paper.latent_channels, paper.plucker_channels) == (16, 32)
    tiny = DecoderConfig.preset("tiny")
    assert (tiny.latent_channels, tiny.plucker_channels) == (1536, 48)
    assert (tiny.near, tiny.far, tiny.distance_shift, tiny.scale_cap, tiny.opacity_shift) == (
        0.1,
        500.0,
        -1.65,
        0.3,
        -2.0,
    )
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


# --- forward --------------------------------------------------------------------------------------------------


def test_tiny_forward_counts_ranges_and_rays(tiny: LatentGaussianDecoder, inputs) -> None:
    latents, plucker, cams = inputs
    with torch.no_grad():
        raw = tiny.forward_raw(latents, plucker)
        g = tiny(latents, plucker, cams)
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


def test_views_are_fused_view_major(tiny: LatentGaussianDecoder, inputs) -> None:
    """No positional embedding + attention-only blocks: swapping the views swaps the two halves of the output."""
    latents, plucker, cams = inputs
    with torch.no_grad():
        g = tiny(latents, plucker, cams)
        swapped = tiny(latents.flip(0), plucker.flip(0), cams[::-1])
    half = g.num // 2
    torch.testing.assert_close(swapped.means[:half], g.means[half:], atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(swapped.colors[half:], g.colors[:half], atol=1e-5, rtol=1e-5)


def test_gaussian_processing_extremes() -> None:
    cfg = DecoderConfig.preset("tiny")
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
    paper_channels = LatentGaussianDecoder(DecoderConfig.preset("tiny", latent_channels=16, plucker_channels=32))
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
