"""Camera-conditioned video generation with diffusers checkpoints from a local folder (GEN3C style).

Supported families: Wan 2.x (``WanPipeline`` T2V bases with 16 input channels, ``WanImageToVideoPipeline`` I2V
bases with 36 = 16 + 4 mask + 16 first-frame channels, without a CLIP image encoder) and CogVideoX 1.0
(``CogVideoXPipeline`` 16 channels, ``CogVideoXImageToVideoPipeline`` 32 = 16 + 16 first-frame channels; its DPM
scheduler is swapped for the DDIM one of the same config). The transformer's patch
embedding is widened by ``2 z`` (+1 indicator channel for T2V bases) zero-initialised input channels for the
VAE-encoded warped video and mask (``lyra_ops.gen3c``); a folder with fine-tuned conditioned transformer
weights (``generator.conditioned_path``, written by ``save_pretrained``) replaces them.

``inspect_checkpoint`` validates a folder from its JSON files and safetensors headers only (cheap, before any
work starts); ``DiffusersVideoGenerator`` loads it once per process and generates seeded teacher videos plus
their normalised VAE latents.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lyra_ops.cameras import Cameras
from lyra_ops.errors import LyraConfigError
from lyra_ops.gen3c import Conditioning, first_frame_mask, mask_video, sample, set_submodule, widen_conv_input
from lyra_ops.generation import check_generation_inputs
from lyra_pipeline.backends.local import local_folder, read_json

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Family:
    """How one diffusers video model family lays out its inputs (the rest of the GEN3C code is shared)."""

    name: str
    pipelines: tuple[str, ...]  # model_index.json _class_name values
    classes: dict[str, str]  # component -> class name
    patch_embedding: str  # submodule path of the input Conv
    z_key: str  # VAE config key of the latent channels
    temporal_key: str  # VAE config key of the temporal compression
    i2v_mask_channels: bool  # Wan I2V adds temporal_factor mask channels to its first-frame condition
    frames_first: bool  # the transformer takes (B, T, C, H, W) instead of (B, C, T, H, W)
    zero_padded_text: bool  # padded text positions are zeroed (Wan) or kept (CogVideoX)


FAMILIES = {
    "wan": Family("wan", ("WanPipeline", "WanImageToVideoPipeline"),
                  {"transformer": "WanTransformer3DModel", "vae": "AutoencoderKLWan",
                   "text_encoder": "UMT5EncoderModel"},
                  "patch_embedding", "z_dim", "scale_factor_temporal", True, False, True),
    "cogvideox": Family("cogvideox", ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline"),
                        {"transformer": "CogVideoXTransformer3DModel", "vae": "AutoencoderKLCogVideoX",
                         "text_encoder": "T5EncoderModel"},
                        "patch_embed.proj", "latent_channels", "temporal_compression_ratio", False, True, False),
}
PIPELINE_FAMILIES = {cls: f.name for f in FAMILIES.values() for cls in f.pipelines}
REQUIRED = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
DEFAULT_NEGATIVE_PROMPT = (
    "blurry, low quality, low resolution, distorted, deformed, flickering, jittery, overexposed, underexposed, "
    "static, frozen frames, watermark, text, artifacts"
)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a validated checkpoint folder holds (from its JSON files only)."""

    path: Path
    family: str
    pipeline_class: str
    mode: str  # "t2v" | "i2v"
    z_dim: int
    base_in_channels: int
    gen3c_channels: int
    temporal_factor: int
    spatial_factor: int
    fingerprint: str  # sha256 of the config files and the weight files' names and sizes

    @property
    def conditioned_in_channels(self) -> int:
        return self.base_in_channels + self.gen3c_channels


def _check_safetensors(path: Path) -> None:
    """Parse the header and check the file is as long as the header says (catches truncated downloads)."""
    data_len = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise LyraConfigError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or n > data_len - 8:
            raise LyraConfigError(f"{path}: corrupt safetensors file (header length {n} vs file size {data_len})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LyraConfigError(f"{path}: corrupt safetensors file (unreadable header)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != data_len:
        raise LyraConfigError(f"{path}: corrupt safetensors file (expected {8 + n + end} bytes, found {data_len}: "
                              "truncated or modified)")


def _weights(folder: Path, what: str) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not files:
        raise LyraConfigError(f"{folder}: no weight files (*.safetensors / *.bin) for the {what}")
    for f in files:
        if f.suffix == ".safetensors":
            _check_safetensors(f)
    return files


def inspect_checkpoint(model_path: str | os.PathLike[str], conditioned_path: str | None = None) -> CheckpointInfo:
    """Validate a local diffusers video checkpoint without loading weights; raise ``LyraConfigError`` naming the
    file, the field and what was expected (missing folder, corrupt files, unsupported family, mismatched VAE /
    transformer, a conditioned transformer of the wrong width)."""
    root = local_folder(model_path, "generator.model_path", "diffusers pipeline")
    index = read_json(root / "model_index.json", "pipeline index")
    cls = index.get("_class_name")
    if cls not in PIPELINE_FAMILIES:
        raise LyraConfigError(f"{root / 'model_index.json'}: _class_name {cls!r} is not a supported video model "
                              f"family; supported pipelines: {sorted(PIPELINE_FAMILIES)}")
    family = PIPELINE_FAMILIES[cls]
    for comp in REQUIRED:
        if not (root / comp).is_dir():
            raise LyraConfigError(f"{root}: component folder {comp!r} missing (model_index.json lists "
                                  f"{sorted(k for k in index if not k.startswith('_'))})")
    fam = FAMILIES[family]
    expected = fam.classes
    for comp, want in expected.items():
        got = (index.get(comp) or [None, None])[1]
        if got != want:
            raise LyraConfigError(f"{root / 'model_index.json'}: {comp} is {got!r}, expected {want!r} for a {cls}")
    if index.get("transformer_2") not in (None, [None, None]):
        raise LyraConfigError(f"{root}: two-transformer (MoE) Wan 2.2 checkpoints are not supported yet")
    t_cfg = read_json(root / "transformer" / "config.json", "transformer config")
    v_cfg = read_json(root / "vae" / "config.json", "VAE config")
    files = _weights(root / "transformer", "transformer") + _weights(root / "vae", "VAE")
    files += _weights(root / "text_encoder", "text encoder")
    if t_cfg.get("image_dim"):
        raise LyraConfigError(f"{root / 'transformer' / 'config.json'}: image_dim={t_cfg['image_dim']} (a CLIP "
                              "image-conditioned Wan 2.1 I2V) is not supported yet; use a Wan T2V or Wan 2.2 I2V base")
    z = int(v_cfg.get(fam.z_key, 16))
    tf = int(v_cfg.get(fam.temporal_key) or 4)
    base_in = int(t_cfg.get("in_channels", 16))
    i2v_in = 2 * z + (tf if fam.i2v_mask_channels else 0)
    if base_in == z:
        mode = "t2v"
    elif base_in == i2v_in:
        mode = "i2v"
    else:
        raise LyraConfigError(
            f"mismatched VAE/transformer pair in {root}: the transformer takes in_channels={base_in}, but a "
            f"{z}-channel VAE (vae/config.json {fam.z_key}) needs {z} (text-to-video) or {i2v_in} (image-to-video)"
        )
    if t_cfg.get("patch_size_t"):
        raise LyraConfigError(f"{root / 'transformer' / 'config.json'}: patch_size_t={t_cfg['patch_size_t']} "
                              "(CogVideoX 1.5, a Linear patch embedding) is not supported yet")
    if int(t_cfg.get("out_channels", z)) != z:
        raise LyraConfigError(f"mismatched VAE/transformer pair in {root}: transformer out_channels="
                              f"{t_cfg.get('out_channels')} but the VAE has z_dim={z}")
    gen3c = 2 * z + (1 if mode == "t2v" else 0)
    digest = hashlib.sha256()
    for p in [root / "model_index.json", root / "transformer" / "config.json", root / "vae" / "config.json",
              root / "scheduler" / "scheduler_config.json"]:
        digest.update(p.read_bytes() if p.is_file() else b"")
    for f in files:
        digest.update(f"{f.relative_to(root)}:{f.stat().st_size}".encode())
    info = CheckpointInfo(root.resolve(), family, cls, mode, z, base_in, gen3c, tf,
                          int(v_cfg.get("scale_factor_spatial") or 8),
                          digest.hexdigest()[:32])
    if conditioned_path:
        cond = Path(conditioned_path).expanduser()
        c_cfg = read_json(cond / "config.json", "conditioned transformer config")
        _weights(cond, "conditioned transformer")
        if int(c_cfg.get("in_channels", -1)) != info.conditioned_in_channels:
            raise LyraConfigError(
                f"{cond / 'config.json'}: in_channels={c_cfg.get('in_channels')} but {root} widened for GEN3C "
                f"needs {info.conditioned_in_channels} ({base_in} base + {gen3c} warp/mask channels)"
            )
    return info


def check_frame_format(info: CheckpointInfo, num_frames: int, height: int, width: int) -> None:
    """The video format the VAE and the transformer's 2x2 patches accept."""
    tf, sf = info.temporal_factor, info.spatial_factor
    if (num_frames - 1) % tf:
        raise LyraConfigError(f"video.num_frames={num_frames}: {info.pipeline_class} needs {tf}k+1 frames")
    if height % (2 * sf) or width % (2 * sf):
        raise LyraConfigError(f"video size {height}x{width}: {info.pipeline_class} needs multiples of {2 * sf}")


# ------------------------------------------------------------------------------------------------------------
# Loading (once per process and configuration)
# ------------------------------------------------------------------------------------------------------------

_LOADED: dict[tuple, Any] = {}
_LOAD_LOCK = threading.Lock()


def widen_transformer(transformer, info: CheckpointInfo):
    """GEN3C widening in place: patch embedding + ``info.gen3c_channels`` zero-initialised input channels."""
    attr = FAMILIES[info.family].patch_embedding
    conv = transformer.get_submodule(attr)
    set_submodule(transformer, attr, widen_conv_input(conv, info.gen3c_channels))
    transformer.register_to_config(in_channels=info.conditioned_in_channels)
    return transformer


def load_pipeline(info: CheckpointInfo, *, conditioned_path: str | None, dtype: torch.dtype, device: str,
                  cpu_offload: bool = False, vae_tiling: bool = False, vae_slicing: bool = False):
    """The diffusers pipeline with a GEN3C-conditioned transformer (cached per process)."""
    key = (str(info.path), info.fingerprint, conditioned_path, str(dtype), device, cpu_offload, vae_tiling, vae_slicing)
    with _LOAD_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(str(info.path), local_files_only=True, dtype=dtype)
            if conditioned_path:
                transformer = type(pipe.transformer).from_pretrained(conditioned_path, local_files_only=True,
                                                                     dtype=dtype)
            else:
                transformer = widen_transformer(pipe.transformer, info)
        except LyraConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - diffusers/transformers raise many types for bad folders
            raise LyraConfigError(f"{info.path}: cannot load the checkpoint ({type(exc).__name__}: {exc})") from None
        pipe.transformer = transformer.eval()
        if type(pipe.scheduler).__name__ == "CogVideoXDPMScheduler":  # its step() takes extra state: use DDIM
            from diffusers import CogVideoXDDIMScheduler

            pipe.scheduler = CogVideoXDDIMScheduler.from_config(pipe.scheduler.config)
        pipe.vae.eval()
        pipe.text_encoder.eval()
        if vae_tiling:
            pipe.vae.enable_tiling()
        if vae_slicing:
            pipe.vae.enable_slicing()
        if cpu_offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        _LOADED[key] = pipe
        return pipe


def save_conditioned_transformer(model_path: str, out: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write the GEN3C-widened transformer of ``model_path`` (zero new weights) with ``save_pretrained``: the
    starting point for fine-tuning the conditioning, loadable as ``generator.conditioned_path``."""
    info = inspect_checkpoint(model_path)
    import diffusers

    cls = getattr(diffusers, FAMILIES[info.family].classes["transformer"])
    transformer = cls.from_pretrained(str(info.path / "transformer"), local_files_only=True, dtype=dtype)
    widen_transformer(transformer, info).save_pretrained(str(out), safe_serialization=True)
    return Path(out)


# ------------------------------------------------------------------------------------------------------------
# The generator
# ------------------------------------------------------------------------------------------------------------


class DiffusersVideoGenerator:
    """``VideoGenerator`` over a local diffusers video checkpoint with GEN3C conditioning.

    ``text_cache`` (optional) has ``get(key) -> Tensor | None`` and ``put(key, Tensor)``: prompt embeddings are
    computed once per (text encoder, prompt) and reused across scenes and runs.
    """

    def __init__(self, model_path: str, *, conditioned_path: str | None = None, dtype: str = "float32",
                 device: str = "cpu", steps: int = 35, guidance: float = 1.0,
                 negative_prompt: str = DEFAULT_NEGATIVE_PROMPT, max_text_tokens: int = 512,
                 cpu_offload: bool = False, vae_tiling: bool = False, vae_slicing: bool = False,
                 text_cache=None) -> None:
        self.info = inspect_checkpoint(model_path, conditioned_path)
        self.name = f"diffusers-{self.info.family}-{self.info.mode}"
        self.conditioned_path = conditioned_path
        self.dtype = getattr(torch, dtype)
        self.device, self.steps, self.guidance = device, steps, guidance
        self.negative_prompt, self.max_text_tokens = negative_prompt, max_text_tokens
        self.offload = {"cpu_offload": cpu_offload, "vae_tiling": vae_tiling, "vae_slicing": vae_slicing}
        self.text_cache = text_cache
        self._transformer = None

    @property
    def encoder_id(self) -> str:
        """Identity of the VAE latents this generator writes (stored as the latents' ``encoder`` attribute)."""
        return f"{self.info.family}-vae-{self.info.fingerprint[:12]}"

    def pipeline(self):
        return load_pipeline(self.info, conditioned_path=self.conditioned_path, dtype=self.dtype,
                             device=self.device, **self.offload)

    # --- text -----------------------------------------------------------------------------------------------
    def text_embedding(self, prompt: str) -> torch.Tensor:
        """(1, L, D) UMT5 hidden states, padded positions zeroed as Wan does; cached by (encoder, prompt)."""
        key = hashlib.sha256(json.dumps([self.info.fingerprint, self.max_text_tokens, prompt]).encode()).hexdigest()
        if self.text_cache is not None:
            hit = self.text_cache.get(key)
            if hit is not None:
                return hit
        pipe = self.pipeline()
        tokens = pipe.tokenizer([prompt], padding="max_length", max_length=self.max_text_tokens, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        device = pipe._execution_device if hasattr(pipe, "_execution_device") else self.device
        with torch.no_grad():
            hidden = pipe.text_encoder(tokens.input_ids.to(device), tokens.attention_mask.to(device)).last_hidden_state
        hidden = hidden.float().cpu()
        if FAMILIES[self.info.family].zero_padded_text:
            hidden = hidden * tokens.attention_mask[..., None].float()
        if self.text_cache is not None:
            self.text_cache.put(key, hidden)
        return hidden

    # --- VAE ------------------------------------------------------------------------------------------------
    def _stats(self, pipe) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, std) normalising raw VAE latents: Wan's statistics, or 1 / scaling_factor."""
        cfg = pipe.vae.config
        z = self.info.z_dim
        if getattr(cfg, "latents_mean", None) is not None:
            return torch.tensor(cfg.latents_mean).view(1, z, 1, 1, 1), torch.tensor(cfg.latents_std).view(1, z, 1, 1, 1)
        return torch.zeros(1, z, 1, 1, 1), torch.full((1, z, 1, 1, 1), 1.0 / float(cfg.scaling_factor))

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(T,3,H,W) in [-1,1] -> normalised latents (1, z, T_l, h, w) float32 (the distribution's mode)."""
        pipe = self.pipeline()
        x = video.permute(1, 0, 2, 3)[None].to(pipe.vae.device, pipe.vae.dtype)
        with torch.no_grad():
            z = pipe.vae.encode(x).latent_dist.mode().float().cpu()
        mean, std = self._stats(pipe)
        return (z - mean) / std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (1, z, T_l, h, w) -> frames (T,3,H,W) in [0,1]."""
        pipe = self.pipeline()
        mean, std = self._stats(pipe)
        z = (latents.float() * std + mean).to(pipe.vae.device, pipe.vae.dtype)
        with torch.no_grad():
            video = pipe.vae.decode(z, return_dict=False)[0].float().cpu()
        return ((video[0].permute(1, 0, 2, 3) + 1.0) * 0.5).clamp(0.0, 1.0)

    # --- conditioning and the transformer call (shared by sampling and teacher fine-tuning) ---------------------
    def conditioning(self, first_frame: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor):
        """(base, warp, first_latent) of one video: the family's own image condition (or None), the GEN3C
        channels [indicator (T2V bases), warped-video latent, mask latent], and the clean first-frame latent
        written into latent frame 0 (T2V bases, else None). All (1, C, T_l, h, w) on the CPU."""
        info, fam = self.info, FAMILIES[self.info.family]
        t = warped.shape[0]
        first_signed = first_frame * 2.0 - 1.0
        warp_latent = self.encode(warped)
        mask_latent = self.encode(mask_video(mask))
        _, z, t_l, h, w = warp_latent.shape
        gen3c = [warp_latent, mask_latent]
        base = first_latent = None
        if info.mode == "i2v" and fam.i2v_mask_channels:  # Wan: [mask (tf), latents of first frame + zeros]
            clip = torch.cat([first_signed[None], torch.zeros(t - 1, *first_signed.shape)], dim=0)
            base = torch.cat([first_frame_mask(t_l, h, w, info.temporal_factor)[None], self.encode(clip)], dim=1)
        elif info.mode == "i2v":  # CogVideoX: first-frame latent, zero-padded to T_l latent frames
            image = self.encode(first_signed[None])
            base = torch.cat([image, torch.zeros(1, z, t_l - 1, h, w)], dim=2)
        else:
            first_latent = self.encode(first_signed[None])  # (1, z, 1, h, w): a causal VAE's first latent frame
            indicator = torch.zeros(1, 1, t_l, h, w)
            indicator[:, :, 0] = 1.0
            gen3c = [indicator, *gen3c]
        return base, torch.cat(gen3c, dim=1), first_latent

    @property
    def transformer(self):
        """The GEN3C-conditioned transformer in use (a fine-tuning copy when one was set)."""
        return self._transformer if self._transformer is not None else self.pipeline().transformer

    def use_transformer(self, transformer) -> None:
        """Generate with ``transformer`` instead of the loaded one (teacher fine-tuning trains a copy)."""
        self._transformer = transformer

    def execution_device(self) -> torch.device:
        pipe = self.pipeline()
        return pipe._execution_device if self.offload["cpu_offload"] else torch.device(self.device)

    def denoiser(self, height: int, width: int, latent_frames: int, forward=None):
        """``f(model_input (1,C,T_l,h,w), timestep (1,), text (1,L,D)) -> model output (1,z,T_l,h,w)`` with
        gradients enabled (wrap in ``torch.no_grad()`` to sample). ``forward``: what to call instead of the
        transformer (its DDP wrapper in a distributed job)."""
        pipe, fam, device = self.pipeline(), FAMILIES[self.info.family], self.execution_device()
        transformer = self.transformer
        extra = {}
        if fam.frames_first and getattr(transformer.config, "use_rotary_positional_embeddings", False):
            extra["image_rotary_emb"] = pipe._prepare_rotary_positional_embeddings(height, width, latent_frames,
                                                                                   device)

        def call(x: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
            x = x.to(device, self.dtype)
            if fam.frames_first:
                x = x.permute(0, 2, 1, 3, 4)
            out = (forward or transformer)(hidden_states=x, timestep=timestep.to(device),
                                           encoder_hidden_states=hidden.to(device, self.dtype), return_dict=False,
                                           **extra)[0]
            return out.permute(0, 2, 1, 3, 4) if fam.frames_first else out

        return call

    # --- generation -----------------------------------------------------------------------------------------
    def generate_with_latents(self, first_frame: torch.Tensor, prompt: str, cameras: Cameras, warped: torch.Tensor,
                              mask: torch.Tensor, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher frames (T,3,H,W) in [0,1] and their normalised latents (z, T_l, h, w)."""
        check_generation_inputs(first_frame, cameras, warped, mask)
        check_frame_format(self.info, len(cameras), cameras.height, cameras.width)
        pipe = self.pipeline()
        base, warp, first_latent = self.conditioning(first_frame, warped, mask)
        _, _, t_l, h, w = warp.shape
        text = self.text_embedding(prompt)
        negative = self.text_embedding(self.negative_prompt) if self.guidance != 0 else None
        noise = torch.randn((1, self.info.z_dim, t_l, h, w), generator=torch.Generator().manual_seed(seed))
        device = self.execution_device()
        call = self.denoiser(cameras.height, cameras.width, t_l)

        def denoiser(x: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return call(x, timestep, hidden)

        cond = Conditioning(
            base=base.to(device) if base is not None else None, warp=warp.to(device), text=text,
            negative_text=negative, first_latent=first_latent.to(device) if first_latent is not None else None,
        )  # fmt: skip
        latents = sample(denoiser, pipe.scheduler, noise.to(device), cond, steps=self.steps, guidance=self.guidance,
                         dtype=self.dtype).cpu()
        frames = self.decode(latents)
        frames[0] = first_frame  # frame 0 is the input view by construction
        return frames, latents[0]

    def generate(self, first_frame, prompt, cameras, warped, mask, *, seed: int) -> torch.Tensor:
        return self.generate_with_latents(first_frame, prompt, cameras, warped, mask, seed=seed)[0]
