"""Video generation seam: ``VideoGenerator`` backends turn (first frame, prompt, cameras, warped video, mask)
into the teacher video. ``oracle`` renders the true novel views of a procedural scene (a perfect camera-
controlled video model); ``warp_only`` is the no-model baseline (warped frames, holes filled by push-pull).
Diffusion backends plug in behind the same protocol.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from lyra_ops.cameras import Cameras
from lyra_ops.errors import LyraInputError


@runtime_checkable
class VideoGenerator(Protocol):
    name: str

    def generate(
        self,
        first_frame: torch.Tensor,  # (3,H,W) in [0,1]
        prompt: str,
        cameras: Cameras,  # T cameras, frame 0 = first frame's camera
        warped: torch.Tensor,  # (T,3,H,W) in [-1,1], holes -1
        mask: torch.Tensor,  # (T,1,H,W) bool, True where the warp is trusted
        *,
        seed: int,
    ) -> torch.Tensor:  # (T,3,H,W) in [0,1]
        ...


def check_generation_inputs(first_frame: torch.Tensor, cameras: Cameras, warped: torch.Tensor,
                            mask: torch.Tensor) -> None:
    t = len(cameras)
    h, w = cameras.height, cameras.width
    if first_frame.shape != (3, h, w):
        raise LyraInputError(f"first_frame must have shape (3, {h}, {w}), got {tuple(first_frame.shape)}")
    if warped.shape != (t, 3, h, w):
        raise LyraInputError(f"warped must have shape ({t}, 3, {h}, {w}), got {tuple(warped.shape)}")
    if mask.shape != (t, 1, h, w):
        raise LyraInputError(f"mask must have shape ({t}, 1, {h}, {w}), got {tuple(mask.shape)}")


class OracleGenerator:
    """Renders the exact novel views of a procedural scene: what a perfect camera-controlled model outputs."""

    name = "oracle"

    def __init__(self, scene) -> None:  # scene: lyra_ops.scenes.ProceduralScene
        self.scene = scene

    def generate(self, first_frame, prompt, cameras, warped, mask, *, seed: int) -> torch.Tensor:
        check_generation_inputs(first_frame, cameras, warped, mask)
        return self.scene.render(cameras.c2w, cameras.K, cameras.height, cameras.width).rgb


def push_pull_fill(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fill holes (mask False) of (N,C,H,W) images from a pyramid of masked averages (push-pull inpainting)."""
    m = mask.to(image.dtype)
    if image.shape[-1] <= 1 or image.shape[-2] <= 1 or bool(m.all()):
        return image
    coarse_img = F.avg_pool2d(image * m, 2, ceil_mode=True)
    coarse_w = F.avg_pool2d(m, 2, ceil_mode=True)
    coarse = torch.where(coarse_w > 0, coarse_img / coarse_w.clamp_min(1e-12), torch.zeros_like(coarse_img))
    filled_coarse = push_pull_fill(coarse, coarse_w > 0)
    up = F.interpolate(filled_coarse, scale_factor=2, mode="nearest")[..., : image.shape[-2], : image.shape[-1]]
    return torch.where(mask, image, up)


class WarpOnlyGenerator:
    """No-model baseline: the warped video with holes filled by push-pull. Not a generative model."""

    name = "warp_only"

    def generate(self, first_frame, prompt, cameras, warped, mask, *, seed: int) -> torch.Tensor:
        check_generation_inputs(first_frame, cameras, warped, mask)
        return warp_only_video(first_frame, warped, mask)


def warp_only_video(first_frame: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The warp-only video (T,3,H,W) in [0,1]: warped frames, holes filled by push-pull, frame 0 the input."""
    frames01 = ((warped + 1.0) * 0.5).clamp(0.0, 1.0)
    out = push_pull_fill(frames01, mask.expand_as(frames01))
    out[0] = first_frame  # frame 0 is the input view by construction
    return out
