"""Per-pixel camera rays and Plücker ray embeddings (spec 4.2), and their encoding onto the latent grid.

Rays follow the project convention: OpenCV cameras, pixel (row i, col j) centred at continuous image
coordinates (x, y) = (j + 0.5, i + 0.5). Everything is computed in float32 (or float64 on request), never in
bf16 as the reference does (spec weakness 22: bf16 puts ~0.4 % relative error on distances up to 500).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lyra_ops.cameras import Cameras
from lyra_ops.errors import LyraInputError
from lyra_ops.latents import (
    LatentEncoder,
    PixelPatchifyEncoder,
    causal_temporal_groups,
    check_video,
    latent_frame_count,
)

PLUCKER_CHANNELS = 6  # [moment o x d (3), direction d (3)]


def _check_downsample(cameras: Cameras, downsample: int) -> tuple[int, int]:
    if not isinstance(cameras, Cameras):
        raise LyraInputError(f"cameras must be a lyra_ops.cameras.Cameras, got {type(cameras).__name__}")
    if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1:
        raise LyraInputError(f"downsample must be a positive int, got {downsample!r}")
    if cameras.height % downsample or cameras.width % downsample:
        raise LyraInputError(
            f"downsample={downsample} must divide the image size, got {cameras.height} x {cameras.width}"
        )
    return cameras.height // downsample, cameras.width // downsample


def pixel_rays(
    cameras: Cameras, *, downsample: int = 1, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space rays through pixel centres: origins (N,h,w,3) and unit directions (N,h,w,3).

    With ``downsample`` s (h = H/s, w = W/s), ray (i, j) passes through the full-resolution continuous image
    point (x, y) = (s j + s/2, s i + s/2), the centre of the s x s pixel block it stands for; this equals
    dividing all four intrinsics by s (spec 4.2, the 1/8-resolution "Gaussian rays" use s = 8).
    Directions: d = R K^-1 (x, y, 1)^T, normalised after rotation (so they are unit even when R drifts from
    orthonormal by float error). Origins are the camera centres, returned as a broadcast (read-only) view.
    ``dtype`` float32 (default) or float64.
    """
    if dtype not in (torch.float32, torch.float64):
        raise LyraInputError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    h, w = _check_downsample(cameras, downsample)
    k = cameras.K.to(dtype)
    c2w = cameras.c2w.to(dtype)
    device = c2w.device
    s = float(downsample)
    xs = torch.arange(w, dtype=dtype, device=device) * s + s / 2.0
    ys = torch.arange(h, dtype=dtype, device=device) * s + s / 2.0
    fx, fy, cx, cy = (v[:, None, None] for v in (k[:, 0, 0], k[:, 1, 1], k[:, 0, 2], k[:, 1, 2]))
    n = len(cameras)
    cam_x = ((xs[None, None, :] - cx) / fx).expand(n, h, w)
    cam_y = ((ys[None, :, None] - cy) / fy).expand(n, h, w)
    cam = torch.stack([cam_x, cam_y, torch.ones_like(cam_x)], dim=-1)  # (N,h,w,3)
    dirs = F.normalize(torch.einsum("nij,nhwj->nhwi", c2w[:, :3, :3], cam), dim=-1)
    origins = c2w[:, None, None, :3, 3].expand(n, h, w, 3)
    return origins, dirs


def plucker_embedding(cameras: Cameras, *, downsample: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plücker coordinates (N,6,h,w) of the rays of :func:`pixel_rays`: channels [o x d (3), d (3)].

    Moment first, then unit direction, as in Lyra's ``ray_condition``; computed in float32 by default.
    """
    origins, dirs = pixel_rays(cameras, downsample=downsample, dtype=dtype)
    moment = torch.linalg.cross(origins, dirs, dim=-1)
    return torch.cat([moment, dirs], dim=-1).permute(0, 3, 1, 2).contiguous()


def plucker_latent_channels(encoder: LatentEncoder) -> int:
    """Channels of :func:`encode_plucker`'s output for ``encoder``: 48 for the patchify fallback, else 2 C."""
    if isinstance(encoder, PixelPatchifyEncoder):
        return encoder.temporal_factor * PLUCKER_CHANNELS
    return 2 * int(encoder.latent_channels)


def encode_plucker(plucker: torch.Tensor, encoder: LatentEncoder) -> torch.Tensor:
    """Bring a full-resolution Plücker video (T,6,H,W) onto the latent grid: (C_p, T_l, H/8, W/8) float32.

    * A real video VAE (any :class:`~lyra_ops.latents.LatentEncoder` other than the patchify one): as Lyra
      (``encode_plucker_vae``), the moment and direction halves are encoded as two 3-channel videos, raw values
      without rescaling, and concatenated: C_p = 2 C (32 for a 16-channel VAE), moment latents first.
    * :class:`~lyra_ops.latents.PixelPatchifyEncoder` (no VAE): each of the 8 causal temporal slots of a latent
      frame (grouped exactly as the latents are) is average-pooled over its 8 x 8 pixel block, and the slots are
      stacked: C_p = 8 slots * 6 = 48, ``channel = slot * 6 + plucker_channel``. Why not patchify losslessly
      (3072 channels)? Within one frame a block's 64 Plücker vectors are a smooth function of the pixel position
      fixed by one camera, so the block mean (very nearly the ray through the block centre) keeps what varies
      between cells, while 3072 channels would be 64x redundant and dwarf the 1536 image channels in the patch
      embedding. Keeping the 8 slots separate keeps the per-frame camera motion inside a latent frame.
    """
    if not isinstance(plucker, torch.Tensor) or plucker.ndim != 4 or plucker.shape[1] != PLUCKER_CHANNELS:
        shape = tuple(plucker.shape) if isinstance(plucker, torch.Tensor) else type(plucker).__name__
        raise LyraInputError(f"plucker must be a tensor (T, 6, H, W) from plucker_embedding, got {shape}")
    if isinstance(encoder, PixelPatchifyEncoder):
        check_video(plucker, name="plucker", spatial_factor=encoder.spatial_factor)
        return plucker_pooled(plucker, temporal_factor=encoder.temporal_factor, spatial_factor=encoder.spatial_factor)
    moment = encoder.encode(plucker[:, :3])
    direction = encoder.encode(plucker[:, 3:])
    return torch.cat([moment, direction], dim=0).float()


def plucker_pooled(plucker: torch.Tensor, *, temporal_factor: int = 8, spatial_factor: int = 8) -> torch.Tensor:
    """The patchify fallback of :func:`encode_plucker`: (T,6,H,W) -> (8*6, T_l, H/8, W/8) block means per slot."""
    t_l = latent_frame_count(int(plucker.shape[0]), temporal_factor=temporal_factor)
    height, width = int(plucker.shape[2]), int(plucker.shape[3])
    groups = causal_temporal_groups(plucker.float(), temporal_factor=temporal_factor)  # (T_l, 8, 6, H, W)
    pooled = F.avg_pool2d(groups.reshape(-1, PLUCKER_CHANNELS, height, width), spatial_factor)
    pooled = pooled.reshape(t_l, temporal_factor, PLUCKER_CHANNELS, height // spatial_factor, width // spatial_factor)
    return pooled.permute(1, 2, 0, 3, 4).reshape(
        temporal_factor * PLUCKER_CHANNELS, t_l, height // spatial_factor, width // spatial_factor
    )
