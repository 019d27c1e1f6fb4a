"""The tiny camera-conditioned teacher: a pixel-space flow-matching diffusion model small enough to train and run
on a CPU, shipped with the package (``generator.backend: tiny``).

Model: a diffusers ``UNet2DModel`` (convolutional, no attention, so it runs at any resolution it was not trained
at) that denoises one frame at a time. Its input is the noisy frame followed by GEN3C-style conditioning
(``lyra_ops.teacher.CONDITION_CHANNELS``: the forward-warped frame with holes at -1, the mask as ``2m - 1`` and
the input view); its output is the flow-matching velocity. Sampling uses diffusers'
``FlowMatchEulerDiscreteScheduler`` through the same loop as the large backends (``lyra_ops.gen3c.sample``);
every frame of a video starts from the same seeded noise, so fills agree between frames where the conditioning
does. Frame 0 is the input view. The network predicts the clean frame (``prediction: sample``), converted to
the scheduler's velocity; the training loss is the flow-matching loss in that parametrisation.

A teacher folder is what ``UNet2DModel.save_pretrained`` writes (``config.json`` +
``diffusion_pytorch_model.safetensors``) plus ``teacher.json`` (format, sampling settings, how it was trained and
what it scored). ``flows/train_teacher.py`` makes one; the shipped one is ``lyra_pipeline/weights/tiny_teacher``.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lyra_ops.errors import LyraConfigError
from lyra_ops.gen3c import Conditioning, sample
from lyra_ops.generation import check_generation_inputs
from lyra_ops.teacher import CONDITION_WIDTH, teacher_condition
from lyra_pipeline.backends.local import local_folder, read_json

TEACHER_FORMAT = "lyra-tiny-teacher"
TEACHER_FORMAT_VERSION = 1
SHIPPED_TEACHER = Path(__file__).resolve().parent.parent / "weights" / "tiny_teacher"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class TinyUNetSpec:
    """Architecture of the tiny teacher's UNet (down-sampling levels = len(channels) - 1)."""

    channels: tuple[int, ...] = (48, 64, 96)
    layers_per_block: int = 1
    norm_groups: int = 16
    patch: int = 4  # pixels per side folded into channels (lossless space-to-depth, like a VAE's 8x8 but exact)

    @property
    def multiple(self) -> int:
        return self.patch * 2 ** (len(self.channels) - 1)


FRAME_CHANNELS = 3 + CONDITION_WIDTH  # noisy frame + GEN3C conditioning, per pixel


def build_unet(spec: TinyUNetSpec, seed: int = 0):
    """A fresh ``UNet2DModel`` on ``patch`` x ``patch`` space-to-depth frames: [noisy frame (3), conditioning (7)]
    per pixel in, a 3-channel velocity per pixel out."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    n, p2 = len(spec.channels), spec.patch**2
    return UNet2DModel(
        sample_size=16, in_channels=FRAME_CHANNELS * p2, out_channels=3 * p2, block_out_channels=spec.channels,
        down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
        layers_per_block=spec.layers_per_block, norm_num_groups=spec.norm_groups, add_attention=False,
    )  # fmt: skip


def unet_patch(config) -> int:
    """The space-to-depth factor of a teacher UNet, from its input width (``FRAME_CHANNELS`` p^2)."""
    p = round(math.sqrt(int(config["in_channels"]) / FRAME_CHANNELS))
    if p < 1 or FRAME_CHANNELS * p * p != int(config["in_channels"]) or int(config["out_channels"]) != 3 * p * p:
        raise LyraConfigError(f"UNet in_channels={config['in_channels']} / out_channels={config['out_channels']}: "
                              f"expected {FRAME_CHANNELS} p^2 / 3 p^2 (noisy frame + GEN3C conditioning, p x p "
                              "space-to-depth)")
    return p


PREDICTIONS = ("sample", "velocity")
SIGMA_FLOOR = 1e-3  # sample -> velocity conversion divides by sigma


def network_output(model, noisy: torch.Tensor, cond: torch.Tensor, timestep: torch.Tensor,
                   forward=None) -> torch.Tensor:
    """The UNet's raw output for (N,3,H,W) noisy frames and their (N,7,H,W) conditioning at scheduler
    timesteps (N,) = 1000 sigma. Frames are edge-padded to the model's multiple, folded p x p into channels,
    and the output unfolded and cropped back. ``forward``: what to call (a DDP wrapper of ``model``)."""
    p = unet_patch(model.config)
    x = torch.cat([noisy, cond], dim=1)
    h, w = x.shape[-2:]
    m = p * 2 ** (len(model.config.block_out_channels) - 1)
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    out = (forward or model)(F.pixel_unshuffle(x, p), timestep).sample
    return F.pixel_shuffle(out, p)[..., :h, :w]


def velocity(model, noisy: torch.Tensor, cond: torch.Tensor, timestep: torch.Tensor,
             prediction: str = "sample") -> torch.Tensor:
    """The flow-matching velocity the sampler steps with. ``prediction``: what the network outputs, the clean
    frame (``sample``: v = (x - x0) / sigma, exact at the last Euler step; a small network cannot reproduce the
    input noise pixel for pixel, which velocity prediction demands) or the velocity itself."""
    out = network_output(model, noisy, cond, timestep)
    if prediction == "velocity":
        return out
    sigma = (timestep.float() / 1000.0).clamp_min(SIGMA_FLOOR).view(-1, 1, 1, 1)
    return (noisy - out) / sigma


def inspect_teacher(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate a tiny-teacher folder from its JSON files and weights header; returns its ``teacher.json``."""
    root = local_folder(path, "generator.model_path", "tiny teacher")
    meta = read_json(root / "teacher.json", "tiny teacher description")
    if meta.get("format") != TEACHER_FORMAT:
        raise LyraConfigError(f"{root / 'teacher.json'}: format {meta.get('format')!r}, expected {TEACHER_FORMAT!r}")
    if meta.get("prediction", "velocity") not in PREDICTIONS:
        raise LyraConfigError(f"{root / 'teacher.json'}: prediction {meta.get('prediction')!r}, expected one of "
                              f"{PREDICTIONS}")
    if int(meta.get("format_version", -1)) > TEACHER_FORMAT_VERSION:
        raise LyraConfigError(f"{root / 'teacher.json'}: format_version {meta.get('format_version')} is newer than "
                              f"this lyra-pipeline reads ({TEACHER_FORMAT_VERSION}); upgrade lyra-pipeline")
    cfg = read_json(root / "config.json", "UNet config")
    if cfg.get("_class_name") != "UNet2DModel":
        raise LyraConfigError(f"{root / 'config.json'}: _class_name {cfg.get('_class_name')!r}, expected 'UNet2DModel'")
    try:
        unet_patch(cfg)
    except LyraConfigError as exc:
        raise LyraConfigError(f"{root / 'config.json'}: {exc}") from None
    except (KeyError, TypeError, ValueError):
        raise LyraConfigError(f"{root / 'config.json'}: in_channels / out_channels missing or not integers") from None
    if not (root / WEIGHTS_FILE).is_file():
        raise LyraConfigError(f"{root}: weights {WEIGHTS_FILE} missing")
    from lyra_pipeline.backends.diffusers_video import _check_safetensors

    _check_safetensors(root / WEIGHTS_FILE)
    return meta


_LOADED: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def load_teacher(path: str | os.PathLike[str], device: str = "cpu"):
    """(UNet in eval mode, teacher.json) from a teacher folder, loaded once per process."""
    root = Path(path).expanduser().resolve()
    stat = (root / WEIGHTS_FILE).stat() if (root / WEIGHTS_FILE).exists() else None
    key = (str(root), device, stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)
    with _LOCK:
        if key not in _LOADED:
            meta = inspect_teacher(root)
            from diffusers import UNet2DModel

            try:
                model = UNet2DModel.from_pretrained(str(root), local_files_only=True)
            except Exception as exc:  # noqa: BLE001 - diffusers raises many types for bad folders
                raise LyraConfigError(f"{root}: cannot load the tiny teacher ({type(exc).__name__}: {exc})") from None
            _LOADED[key] = (model.to(device).eval(), meta)
        return _LOADED[key]


def make_scheduler(shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def sample_frames(model, cond: torch.Tensor, noise: torch.Tensor, *, steps: int, shift: float,
                  prediction: str = "sample") -> torch.Tensor:
    """Denoise (N,3,H,W) ``noise`` given (N,7,H,W) conditioning; returns frames in [-1,1]."""

    def denoiser(x: torch.Tensor, timestep: torch.Tensor, _text) -> torch.Tensor:
        with torch.no_grad():
            return velocity(model, x[:, :3], x[:, 3:], timestep, prediction)

    c = Conditioning(base=None, warp=cond, text=torch.zeros(0), negative_text=None)
    return sample(denoiser, make_scheduler(shift), noise, c, steps=steps, guidance=0.0).clamp(-1.0, 1.0)


class TinyTeacherGenerator:
    """``VideoGenerator`` running a tiny teacher folder (default: the shipped one)."""

    name = "tiny"

    def __init__(self, model_path: str | None = None, *, steps: int | None = None, device: str = "cpu",
                 frame_batch: int = 8) -> None:
        self.path = Path(model_path).expanduser() if model_path else SHIPPED_TEACHER
        self.meta = inspect_teacher(self.path)
        self.steps = int(steps or self.meta.get("sampling_steps", 10))
        self.shift = float(self.meta.get("shift", 1.0))
        self.prediction = str(self.meta.get("prediction", "velocity"))
        self.device, self.frame_batch = device, frame_batch

    def generate(self, first_frame, prompt, cameras, warped, mask, *, seed: int) -> torch.Tensor:
        check_generation_inputs(first_frame, cameras, warped, mask)
        model, _ = load_teacher(self.path, self.device)
        t, _, h, w = warped.shape
        cond = teacher_condition(warped.float(), mask.bool(), first_frame.float())
        noise = torch.randn((1, 3, h, w), generator=torch.Generator().manual_seed(seed))
        out = torch.empty(t, 3, h, w)
        for a in range(1, t, self.frame_batch):  # frame 0 is the input view
            b = min(a + self.frame_batch, t)
            x = sample_frames(model, cond[a:b].to(self.device), noise.expand(b - a, -1, -1, -1).to(self.device),
                              steps=self.steps, shift=self.shift, prediction=self.prediction)
            out[a:b] = ((x.cpu() + 1.0) * 0.5).clamp(0.0, 1.0)
        out[0] = first_frame
        return out


def write_teacher_folder(model, out: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    """Save a trained UNet with ``save_pretrained`` and its ``teacher.json`` (format + ``meta``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    doc = {"format": TEACHER_FORMAT, "format_version": TEACHER_FORMAT_VERSION, **meta}
    (out / "teacher.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return out
