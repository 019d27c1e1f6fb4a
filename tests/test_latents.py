"""Latent format rules and the lossless PixelPatchifyEncoder."""

from __future__ import annotations

import pytest
import torch

from lyra_ops.errors import LyraInputError
from lyra_ops.latents import (
    LatentEncoder,
    PixelPatchifyEncoder,
    causal_temporal_groups,
    latent_frame_count,
    pixel_frame_count,
)


def random_frames(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(t, 3, h, w, generator=gen) * 2 - 1


def test_frame_count_rules() -> None:
    assert [latent_frame_count(t) for t in (1, 9, 17, 121)] == [1, 2, 3, 16]
    assert [pixel_frame_count(t) for t in (1, 2, 3, 16)] == [1, 9, 17, 121]
    for bad in (8, 10, 120):
        with pytest.raises(LyraInputError, match="8k\\+1"):
            latent_frame_count(bad)
    with pytest.raises(LyraInputError, match="positive int"):
        latent_frame_count(0)


@pytest.mark.parametrize("t,h,w", [(9, 16, 24), (17, 32, 8), (1, 8, 8)])
def test_round_trip_is_bit_exact(t: int, h: int, w: int) -> None:
    enc = PixelPatchifyEncoder()
    frames = random_frames(t, h, w, seed=t)
    latent = enc.encode(frames)
    assert latent.shape == (1536, 1 + (t - 1) // 8, h // 8, w // 8)
    assert latent.dtype == torch.float32
    assert torch.equal(enc.decode(latent), frames)


def test_encoder_satisfies_protocol() -> None:
    enc = PixelPatchifyEncoder()
    assert isinstance(enc, LatentEncoder)
    assert (enc.latent_channels, enc.temporal_factor, enc.spatial_factor) == (1536, 8, 8)


def test_documented_channel_order_and_causal_grouping() -> None:
    enc = PixelPatchifyEncoder()
    frames = random_frames(17, 16, 24, seed=3)
    latent = enc.encode(frames)
    for k, slot, rgb, y, dy, x, dx in [(0, 5, 2, 1, 7, 2, 3), (1, 0, 0, 0, 0, 0, 0), (2, 7, 1, 1, 4, 1, 6)]:
        channel = ((slot * 3 + rgb) * 8 + dy) * 8 + dx
        frame = 0 if k == 0 else 8 * (k - 1) + 1 + slot
        assert latent[channel, k, y, x] == frames[frame, rgb, 8 * y + dy, 8 * x + dx]
    # latent frame 0 replicates frame 0 in all 8 temporal slots
    slots = latent[:, 0].reshape(8, 192, 2, 3)
    assert all(torch.equal(slots[0], slots[s]) for s in range(8))
    groups = causal_temporal_groups(frames)
    assert groups.shape == (3, 8, 3, 16, 24)
    assert torch.equal(groups[2, 0], frames[9]) and torch.equal(groups[1, 7], frames[8])


def test_encode_errors() -> None:
    enc = PixelPatchifyEncoder()
    with pytest.raises(LyraInputError, match="8k\\+1"):
        enc.encode(random_frames(8, 16, 16))
    with pytest.raises(LyraInputError, match="multiples of 8"):
        enc.encode(random_frames(9, 12, 16))
    with pytest.raises(LyraInputError, match="3 colour channels"):
        enc.encode(torch.zeros(9, 4, 16, 16))
    with pytest.raises(LyraInputError, match=r"\[-1, 1\]"):
        enc.encode(random_frames(9, 16, 16) * 128 + 128)
    with pytest.raises(LyraInputError, match="NaN"):
        enc.encode(torch.full((9, 3, 16, 16), float("nan")))
    with pytest.raises(LyraInputError, match="1536"):
        enc.decode(torch.zeros(16, 2, 2, 2))
