"""Fine-tuning GEN3C conditioning of a diffusers video model (Wan 2.x, flow matching) on exact pairs.

The trainable part is the widened patch embedding (its new warp/mask channels start at zero, so step 0 is the
base model) and, optionally, LoRA adapters (peft) on the attention projections. The objective is Wan's: flow
matching on normalised VAE latents, ``x_sigma = (1 - sigma) x0 + sigma noise``, the transformer predicts
``noise - x0`` at timestep ``1000 sigma``; for T2V bases latent frame 0 holds the clean first-frame latent (as
when sampling) and is left out of the loss. The finished model is the conditioned transformer folder
(``save_pretrained``, LoRA merged) that ``generator.conditioned_path`` loads.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lyra_ops.errors import LyraConfigError
from lyra_ops.teacher import flow_match_noisy, flow_match_target, sample_sigmas
from lyra_pipeline.backends.diffusers_video import FAMILIES, DiffusersVideoGenerator, check_frame_format

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TRAINABLE_FAMILIES = ("wan",)  # flow-matching objective; CogVideoX trains with v-prediction DDPM


class DiffusersTeacher:
    """A trainable copy of a local checkpoint's GEN3C-conditioned transformer, with its generator."""

    def __init__(self, model_path: str, *, conditioned_path: str | None = None, lora_rank: int = 0,
                 device: str = "cpu", sampling_steps: int = 35, guidance: float = 0.0, seed: int = 0) -> None:
        self.generator = DiffusersVideoGenerator(model_path, conditioned_path=conditioned_path, dtype="float32",
                                                 device=device, steps=sampling_steps, guidance=guidance)
        info = self.generator.info
        if info.family not in TRAINABLE_FAMILIES:
            raise LyraConfigError(f"{model_path}: teacher fine-tuning supports flow-matching families "
                                  f"{TRAINABLE_FAMILIES}; {info.pipeline_class} ({info.family}) is not supported yet")
        torch.manual_seed(seed)
        transformer = copy.deepcopy(self.generator.pipeline().transformer).to(device)
        transformer.requires_grad_(False)
        if lora_rank:
            try:
                from peft import LoraConfig
            except ImportError:
                raise LyraConfigError("teacher lora_rank > 0 needs peft: pip install 'lyra-pipeline[models]'") from None
            transformer.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                               target_modules=list(LORA_TARGETS)))
        embed = transformer.get_submodule(FAMILIES[info.family].patch_embedding)
        embed.requires_grad_(True)
        self.module = transformer.train()
        self.lora_rank = lora_rank
        self.generator.use_transformer(self.module)

    def check_frames(self, frames: int, height: int, width: int) -> None:
        check_frame_format(self.generator.info, frames, height, width)

    def loss(self, truth: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor, first: torch.Tensor, prompt: str,
             gen: torch.Generator, forward=None) -> torch.Tensor:
        """Flow-matching loss of one video: ``truth`` (T,3,H,W) and ``warped`` (holes -1) in [-1,1], ``mask``
        (T,1,H,W) bool, ``first`` (3,H,W) in [0,1]; noise level and noise drawn from ``gen``. ``forward``: the
        transformer's DDP wrapper in a distributed job."""
        g = self.generator
        with torch.no_grad():
            x0 = g.encode(truth)
            base, warp, first_latent = g.conditioning(first, warped, mask)
            text = g.text_embedding(prompt)
        sigma = sample_sigmas(1, gen, shift=float(g.pipeline().scheduler.config.get("shift", 1.0)))
        noise = torch.randn(x0.shape, generator=gen)
        noisy = flow_match_noisy(x0, noise, sigma)
        skip = 0
        if first_latent is not None:
            noisy[:, :, :1] = first_latent
            skip = 1
        parts = [noisy] + ([base] if base is not None else []) + [warp]
        _, _, t_l, _, _ = x0.shape
        call = g.denoiser(truth.shape[-2], truth.shape[-1], t_l, forward=forward)
        pred = call(torch.cat(parts, dim=1), sigma * 1000.0, text)
        target = flow_match_target(x0, noise).to(pred.device)
        return F.mse_loss(pred[:, :, skip:].float(), target[:, :, skip:])

    def video(self, first: torch.Tensor, prompt: str, cameras, warped: torch.Tensor, mask: torch.Tensor,
              seed: int) -> torch.Tensor:
        self.module.eval()
        try:
            return self.generator.generate(first, prompt, cameras, warped, mask, seed=seed)
        finally:
            self.module.train()

    def save_folder(self, out: str | Path, meta: dict[str, Any]) -> Path:
        """The conditioned transformer (LoRA merged into its weights) with ``save_pretrained`` + teacher.json."""
        import json

        out = Path(out)
        model = copy.deepcopy(self.module).eval()
        if self.lora_rank:
            model.fuse_lora()
            model.unload_lora()
        model.save_pretrained(str(out), safe_serialization=True)
        doc = {"format": "lyra-conditioned-transformer", "base_model": str(self.generator.info.path), **meta}
        (out / "teacher.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
        return out
