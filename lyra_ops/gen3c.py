"""GEN3C-style camera conditioning of a latent video diffusion transformer (spec section 2), model-agnostic.

The warped video and its mask are VAE-encoded and concatenated with the noisy latent along channels; the
transformer's patch embedding gets that many extra *input* channels whose weights start at zero, so a base
checkpoint widened this way computes exactly what it computed before (tested), and fine-tuned conditioning
weights can be dropped in later. Sampling uses the model family's own scheduler with Lyra's guidance rule:
``eps = eps_c + g (eps_c - eps_u)``, the unconditional branch seeing the negative prompt and zeroed warp
latents (g = 1 in Lyra's SDG; g = 0 skips the unconditional pass).

Pure torch: no files, no Prefect. Backends (``lyra_pipeline/backends``) load checkpoints and call these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lyra_ops.errors import LyraConfigError

WARP_BUFFER_CHANNELS_PER_LATENT = 2  # [warped RGB latent, mask latent], each z_dim channels


def widen_conv_input(conv: nn.Module, extra: int) -> nn.Module:
    """A copy of ``conv`` (Conv2d/Conv3d) with ``extra`` more input channels appended, their weights zero.

    The original weights and bias are copied unchanged, so for any input x and any extra channels e:
    ``widened(cat([x, e])) == conv(x)`` when the new weights are zero."""
    if not isinstance(conv, nn.Conv2d | nn.Conv3d):
        raise LyraConfigError(f"patch embedding must be a Conv2d/Conv3d to widen, got {type(conv).__name__}")
    if conv.groups != 1:
        raise LyraConfigError("cannot widen a grouped convolution")
    cls = type(conv)
    new = cls(conv.in_channels + extra, conv.out_channels, conv.kernel_size, stride=conv.stride,
              padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
              padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : conv.in_channels].copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def mask_video(mask: torch.Tensor) -> torch.Tensor:
    """GEN3C's mask video: (T,1,H,W) bool -> (T,3,H,W) in {-1, 1} (m -> 2m - 1, replicated to RGB)."""
    return (mask.float() * 2.0 - 1.0).expand(-1, 3, -1, -1)


def first_frame_mask(latent_frames: int, height: int, width: int, temporal_factor: int) -> torch.Tensor:
    """Wan I2V's mask channels (temporal_factor, T_l, h, w): ones for the first latent frame, zeros elsewhere."""
    mask = torch.zeros(temporal_factor, latent_frames, height, width)
    mask[:, 0] = 1.0
    return mask


def combine_guidance(cond: torch.Tensor, uncond: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """Lyra's classifier-free guidance ``cond + g (cond - uncond)`` (g = 0: the conditional prediction)."""
    if uncond is None or guidance == 0:
        return cond
    return cond + guidance * (cond - uncond)


@dataclass(frozen=True)
class Conditioning:
    """Per-sample tensors (batch dimension 1) fed to :func:`sample`.

    ``base``: the family's own conditioning channels placed right after the noisy latent (e.g. Wan I2V's
    4 mask + 16 first-frame channels), or None; ``warp``: GEN3C channels [warped latent, mask latent];
    ``first_latent``: clean latent of the first frame, written into latent frame 0 before every model call
    (GEN3C's frame conditioning for families without a base image condition), or None; ``text`` /
    ``negative_text``: encoder hidden states (1, L, D)."""

    base: torch.Tensor | None
    warp: torch.Tensor
    text: torch.Tensor
    negative_text: torch.Tensor | None
    first_latent: torch.Tensor | None = None


def sample(
    denoiser: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    noise: torch.Tensor,
    cond: Conditioning,
    *,
    steps: int,
    guidance: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Denoise ``noise`` (1, z, T_l, h, w) with ``scheduler`` (a diffusers scheduler: set_timesteps / step).

    ``denoiser(model_input, timestep, text)`` returns the model output for ``model_input`` = cat([latent, base,
    warp]) along channels. The unconditional branch (when ``guidance`` != 0) uses ``negative_text`` and zeroed
    warp channels (spec 2.3).
    """
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise.float() * float(getattr(scheduler, "init_noise_sigma", 1.0))
    warp_off = torch.zeros_like(cond.warp)
    for t in scheduler.timesteps:
        if cond.first_latent is not None:
            latents[:, :, :1] = cond.first_latent.float()
        scaled = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        parts = [scaled] + ([cond.base] if cond.base is not None else [])
        timestep = t.expand(latents.shape[0]).to(noise.device)
        out_c = denoiser(torch.cat([*parts, cond.warp], dim=1).to(dtype), timestep, cond.text).float()
        out_u = None
        if guidance != 0 and cond.negative_text is not None:
            out_u = denoiser(torch.cat([*parts, warp_off], dim=1).to(dtype), timestep, cond.negative_text).float()
        latents = scheduler.step(combine_guidance(out_c, out_u, guidance), t, latents, return_dict=False)[0]
    if cond.first_latent is not None:
        latents[:, :, :1] = cond.first_latent.float()
    return latents
