"""The pipeline's one latent format and the embedded lossless encoder used when no video VAE is configured.

Latent format (whatever produced it), per trajectory: a float32 tensor (C, T_l, H/8, W/8) with
T_l = 1 + (T - 1) / 8 for a video of T = 8k + 1 frames of H x W pixels (H, W multiples of 8). A real causal
video VAE (Cosmos CV8x8x8, Wan) has C = 16; :class:`PixelPatchifyEncoder` (no weights) has C = 1536.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from lyra_ops.errors import LyraInputError

TEMPORAL_FACTOR = 8  # pixel frames per latent frame (after the first)
SPATIAL_FACTOR = 8  # pixels per latent cell along each image axis
# PixelPatchifyEncoder accepts values in [-1 - tol, 1 + tol]: resampling may overshoot by a few ulps.
RANGE_TOLERANCE = 1e-3


@runtime_checkable
class LatentEncoder(Protocol):
    """A causal video encoder: frames (T,3,H,W) in [-1,1] <-> latents (C, T_l, H/s, W/s) float32.

    ``temporal_factor`` (8) and ``spatial_factor`` (8) fix T_l = 1 + (T-1)/temporal_factor and the latent grid;
    ``latent_channels`` is C. A diffusers VAE adapter (Cosmos / Wan) implements the same four members.
    """

    name: str
    latent_channels: int
    temporal_factor: int
    spatial_factor: int

    def encode(self, frames: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latent: torch.Tensor) -> torch.Tensor: ...


def latent_frame_count(num_frames: int, *, temporal_factor: int = TEMPORAL_FACTOR) -> int:
    """T_l = 1 + (T - 1) / temporal_factor; raises ``LyraInputError`` unless T = temporal_factor * k + 1."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise LyraInputError(f"number of frames must be a positive int, got {num_frames!r}")
    if (num_frames - 1) % temporal_factor:
        below = num_frames - 1 - (num_frames - 1) % temporal_factor + 1
        raise LyraInputError(
            f"number of frames must be {temporal_factor}k+1 (1, 9, 17, ..., 121) for a causal video encoder with "
            f"temporal factor {temporal_factor}, got {num_frames} (nearest valid: {below} or "
            f"{below + temporal_factor})"
        )
    return 1 + (num_frames - 1) // temporal_factor


def pixel_frame_count(latent_frames: int, *, temporal_factor: int = TEMPORAL_FACTOR) -> int:
    """T = temporal_factor * (T_l - 1) + 1, the inverse of :func:`latent_frame_count`."""
    if isinstance(latent_frames, bool) or not isinstance(latent_frames, int) or latent_frames < 1:
        raise LyraInputError(f"number of latent frames must be a positive int, got {latent_frames!r}")
    return temporal_factor * (latent_frames - 1) + 1


def check_video(frames: torch.Tensor, *, name: str = "frames", spatial_factor: int = SPATIAL_FACTOR) -> None:
    """Raise ``LyraInputError`` unless ``frames`` is a floating (T,C,H,W) video, T = 8k+1, H, W multiples of 8."""
    if not isinstance(frames, torch.Tensor):
        raise LyraInputError(f"{name} must be a torch.Tensor (T, C, H, W), got {type(frames).__name__}")
    if frames.ndim != 4:
        raise LyraInputError(f"{name} must have shape (T, C, H, W), got {tuple(frames.shape)}")
    if not frames.is_floating_point():
        raise LyraInputError(f"{name} must be a floating-point tensor, got dtype {frames.dtype}")
    latent_frame_count(int(frames.shape[0]))
    height, width = int(frames.shape[2]), int(frames.shape[3])
    if height % spatial_factor or width % spatial_factor or height == 0 or width == 0:
        raise LyraInputError(
            f"{name}: height and width must be positive multiples of {spatial_factor}, got {height} x {width}"
        )


def causal_temporal_groups(frames: torch.Tensor, *, temporal_factor: int = TEMPORAL_FACTOR) -> torch.Tensor:
    """Group a (T,C,H,W) video, T = 8k+1, into (T_l, 8, C, H, W) causal slots.

    Latent frame 0 holds frame 0 in all 8 slots (a causal VAE replicates the first frame as padding); latent
    frame k >= 1 holds frames 8(k-1)+1 .. 8k in slots 0..7.
    """
    first = frames[:1].expand(temporal_factor - 1, *frames.shape[1:])
    padded = torch.cat([first, frames], dim=0)
    return padded.reshape(-1, temporal_factor, *frames.shape[1:])


class PixelPatchifyEncoder:
    """Lossless causal space-to-depth "VAE" with no weights: the embedded default latent encoder.

    Each latent cell (latent frame k, row y, column x) stores, raw and unscaled, the 3 x 8 x 8 pixels of the
    8 x 8 block at rows 8y..8y+7, columns 8x..8x+7 of each of its 8 frames, so C = 8 * 3 * 8 * 8 = 1536.
    Temporal grouping is causal (see :func:`causal_temporal_groups`): latent frame 0 holds frame 0 in all 8
    slots, latent frame k >= 1 holds frames 8(k-1)+1 .. 8k.

    Channel order: ``channel = ((slot * 3 + rgb) * 8 + dy) * 8 + dx`` with slot the frame within the latent
    frame (0..7), rgb the colour channel, (dy, dx) the pixel inside the 8 x 8 block.

    ``decode`` is the exact inverse (bit-exact for float32 input): frame 0 is read from slot 0 of latent frame 0.
    """

    name = "pixel_patchify"
    temporal_factor = TEMPORAL_FACTOR
    spatial_factor = SPATIAL_FACTOR
    image_channels = 3
    latent_channels = TEMPORAL_FACTOR * 3 * SPATIAL_FACTOR * SPATIAL_FACTOR

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(T,3,H,W) in [-1,1] -> float32 (1536, T_l, H/8, W/8)."""
        check_video(frames, name="frames", spatial_factor=self.spatial_factor)
        if frames.shape[1] != self.image_channels:
            raise LyraInputError(f"frames must have 3 colour channels (T, 3, H, W), got {tuple(frames.shape)}")
        values = frames.detach()
        if not bool(torch.isfinite(values).all()):
            raise LyraInputError("frames contain NaN or Inf values")
        lo, hi = float(values.min()), float(values.max())
        if lo < -1.0 - RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
            raise LyraInputError(
                f"frames must be in [-1, 1] (x * 2 - 1 for images in [0, 1]), got values in [{lo:.4g}, {hi:.4g}]"
            )
        return self._patchify(frames.float())

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(1536, T_l, h, w) -> float32 frames (8 (T_l - 1) + 1, 3, 8h, 8w), the exact inverse of ``encode``."""
        if not isinstance(latent, torch.Tensor) or latent.ndim != 4:
            shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise LyraInputError(f"latent must be a tensor (C, T_l, h, w), got {shape}")
        if latent.shape[0] != self.latent_channels:
            raise LyraInputError(
                f"latent must have C = {self.latent_channels} channels for {self.name}, got shape {tuple(latent.shape)}"
            )
        return self._unpatchify(latent.float(), self.image_channels)

    # --- shared with encode_plucker's fallback and tests -------------------------------------------------
    def _patchify(self, frames: torch.Tensor) -> torch.Tensor:
        tf, s = self.temporal_factor, self.spatial_factor
        t_l = latent_frame_count(int(frames.shape[0]), temporal_factor=tf)
        channels, height, width = (int(v) for v in frames.shape[1:])
        groups = causal_temporal_groups(frames, temporal_factor=tf)  # (T_l, 8, C, H, W)
        cells = groups.reshape(t_l, tf, channels, height // s, s, width // s, s)
        # (T_l, slot, c, y, dy, x, dx) -> (slot, c, dy, dx, T_l, y, x)
        return cells.permute(1, 2, 4, 6, 0, 3, 5).reshape(tf * channels * s * s, t_l, height // s, width // s)

    def _unpatchify(self, latent: torch.Tensor, channels: int) -> torch.Tensor:
        tf, s = self.temporal_factor, self.spatial_factor
        _, t_l, h, w = (int(v) for v in latent.shape)
        cells = latent.reshape(tf, channels, s, s, t_l, h, w).permute(4, 0, 1, 5, 2, 6, 3)
        groups = cells.reshape(t_l, tf, channels, h * s, w * s)
        return torch.cat([groups[0, :1], groups[1:].reshape(-1, channels, h * s, w * s)], dim=0).contiguous()
