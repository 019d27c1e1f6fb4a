"""Text-to-image first frames with a diffusers pipeline from a local folder (PixArt, SD3, FLUX, SDXL, Sana...).

For prompt-bank rows without an image the ``input`` stage generates the first frame: the pipeline runs at the
nearest size its latent grid supports, seeded per scene, and the image is cover-cropped to the video size like
a user image.
"""

from __future__ import annotations

import inspect
import os
import threading
from pathlib import Path

import torch

from lyra_ops.errors import LyraConfigError
from lyra_ops.images import cover_crop_resize
from lyra_pipeline.backends.local import local_folder, read_json

SUPPORTED = ("PixArtSigmaPipeline", "PixArtAlphaPipeline", "StableDiffusion3Pipeline", "FluxPipeline",
             "StableDiffusionXLPipeline", "StableDiffusionPipeline", "SanaPipeline")
_PIPES: dict[tuple, object] = {}
_LOCK = threading.Lock()


def inspect_t2i_checkpoint(model_path: str | os.PathLike[str]) -> str:
    """Validate a local text-to-image pipeline folder from its ``model_index.json``; returns its class name."""
    root = local_folder(model_path, "text_to_image.model_path", "diffusers text-to-image pipeline")
    index_path = root / "model_index.json"
    index = read_json(index_path, "pipeline index")
    cls = index.get("_class_name")
    if cls not in SUPPORTED:
        raise LyraConfigError(f"{index_path}: _class_name {cls!r} is not a supported text-to-image pipeline; "
                              f"supported: {list(SUPPORTED)}")
    for comp, spec in index.items():
        if not comp.startswith("_") and isinstance(spec, list) and spec[0] is not None and not (root / comp).is_dir():
            raise LyraConfigError(f"{root}: component folder {comp!r} missing")
    return cls


class TextToImage:
    """A seeded first-frame generator over a local diffusers text-to-image pipeline."""

    def __init__(self, model_path: str, *, steps: int = 20, guidance: float = 4.5, dtype: str = "float32",
                 device: str = "cpu", max_text_tokens: int = 300) -> None:
        self.cls = inspect_t2i_checkpoint(model_path)
        self.path = str(Path(model_path).expanduser().resolve())
        self.steps, self.guidance, self.device = steps, guidance, device
        self.dtype, self.max_text_tokens = getattr(torch, dtype), max_text_tokens

    def pipeline(self):
        key = (self.path, str(self.dtype), self.device)
        with _LOCK:
            if key not in _PIPES:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                from diffusers import DiffusionPipeline

                try:
                    pipe = DiffusionPipeline.from_pretrained(self.path, local_files_only=True, dtype=self.dtype)
                except Exception as exc:  # noqa: BLE001
                    raise LyraConfigError(
                        f"{self.path}: cannot load the pipeline ({type(exc).__name__}: {exc})"
                    ) from None
                pipe.set_progress_bar_config(disable=True)
                _PIPES[key] = pipe.to(self.device)
            return _PIPES[key]

    def generate(self, prompt: str, height: int, width: int, *, seed: int) -> torch.Tensor:
        """(3, height, width) in [0, 1]."""
        pipe = self.pipeline()
        multiple = 2 * int(getattr(pipe, "vae_scale_factor", 8) or 8)  # latent grid x a 2x2 transformer patch
        h, w = (max(multiple, round(s / multiple) * multiple) for s in (height, width))
        kwargs = {"prompt": prompt, "height": h, "width": w, "num_inference_steps": self.steps,
                  "guidance_scale": self.guidance, "generator": torch.Generator().manual_seed(seed),
                  "output_type": "pt", "max_sequence_length": self.max_text_tokens, "clean_caption": False,
                  "use_resolution_binning": False}
        accepted = inspect.signature(pipe.__call__).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        with torch.no_grad():
            image = pipe(**kwargs).images[0].float().cpu()
        return cover_crop_resize(image.clamp(0, 1), height, width)
