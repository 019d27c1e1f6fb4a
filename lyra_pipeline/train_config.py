"""Training configs (decoder distillation and teacher fine-tuning): pydantic trees, presets, builders.

Light to import (pydantic only): ``lyra train`` / ``lyra train-teacher`` check a preset, a config file's keys and
values before torch or Prefect load. The checks that need the model code (a stage's frame counts, the decoder
architecture, the UNet's down-sampling) import it when they run, after the fields passed. Re-exported by
:mod:`lyra_pipeline.training` and :mod:`lyra_pipeline.teacher_training`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, model_validator

from lyra_ops.errors import LyraConfigError
from lyra_pipeline.config import Section, format_errors, merge

if TYPE_CHECKING:
    from lyra_ops.decoder import DecoderConfig
    from lyra_ops.distill import StageSpec
    from lyra_pipeline.backends.tiny_teacher import TinyUNetSpec

# ------------------------------------------------------------------------------------------------------------
# Decoder distillation (lyra train)
# ------------------------------------------------------------------------------------------------------------


class StageConfig(Section):
    """One progressive stage; see :class:`lyra_ops.distill.StageSpec` for the meaning of each field."""

    name: str
    steps: int = Field(ge=0)
    scale: int = Field(1, ge=1)
    input_frames: int | None = None
    input_views: int = Field(1, ge=1)
    random_views: bool = False
    targets: int = Field(4, ge=1)
    frame_sampling: Literal["uniform", "exponential"] = "uniform"
    prune_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    opacity_weight: float = Field(0.0, ge=0.0)
    input_target: bool = False  # the input frame is a target of every sample (besides the `targets` drawn)
    dynamic: bool = False  # a dynamic stage (Lyra's 8-9): time-conditioned samples from a dynamic store

    def spec(self) -> StageSpec:
        from lyra_ops.distill import StageSpec

        return StageSpec(**self.model_dump())


class OptimConfig(Section):
    """AdamW with a warmed-up learning rate and gradient clipping (Lyra: 1e-4, wd 0.01, 100, 1.0, constant).
    ``schedule`` "cosine" decays the rate after warm-up to ``min_lr_ratio`` x ``lr`` at the run's last step."""

    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    # The time embedding's learning rate, as a multiple of ``lr`` (its zero-initialised maps start a fine-tune
    # from static weights that already sit near a minimum; a larger step lets them move in a few hundred steps).
    time_lr_scale: float = Field(1.0, gt=0)


class LossConfig(Section):
    """Loss weights (Lyra: MSE 1, LPIPS 0.5, depth 0.05). LPIPS runs only with local VGG weights
    (``lpips_weights``: a torchvision VGG16 or LPIPS state dict); without them it is skipped and logged."""

    mse: float = Field(1.0, ge=0)
    lpips: float = Field(0.5, ge=0)
    depth: float = Field(0.05, ge=0)
    depth_mode: Literal["ssi", "log_l1"] = "ssi"  # log_l1: metric depth targets (see lyra_ops.losses)
    gaussian_depth: float = Field(0.0, ge=0)  # per-Gaussian depth vs the input frames' depth (lyra_ops.distill)
    lpips_weights: str | None = None  # full LPIPS-VGG state dict, or the package's linear heads (vgg.pth)
    lpips_backbone: str | None = None  # torchvision VGG16 state dict, with linear-head-only lpips_weights


class TrainConfig(Section):
    """Everything that determines a decoder training run (its hash names the run)."""

    seed: int = 42
    decoder: Literal["tiny", "small", "paper"] = "tiny"
    decoder_overrides: dict[str, Any] = Field(default_factory=dict)
    stages: list[StageConfig]
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    val_scenes: int = Field(1, ge=0)  # held-out scenes (never trained on), chosen by a seeded hash of the id
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(3, ge=1)  # newest N kept, plus the last checkpoint of every stage
    backend: Literal["torch", "gsplat"] = "torch"
    device: str = "cpu"
    views_per_chunk: int = Field(4, ge=1)
    # Samples per optimiser step (the global batch: split over the ranks of `lyra train --nproc N`, so the
    # weights do not depend on N); each is drawn from its own sampling stream.
    batch: int = Field(1, ge=1)
    # bf16: the decoder's forward under bf16 autocast (rendering and losses stay fp32); for GPUs.
    precision: Literal["fp32", "bf16"] = "fp32"
    # What the training renders are composited over: "decoder" (the decoder's own `background`, e.g. the input
    # mean colour) or "random" (a uniform random colour per sample): a pixel the teacher shows must then be covered
    # by opaque Gaussians, so exports look the same over any viewer's background (white, PlayCanvas grey, ...).
    background: Literal["decoder", "random"] = "decoder"
    torch_threads: int | None = Field(1, ge=1)  # pin intra-op threads (None: torch's default)
    eval_frame_stride: int = Field(1, ge=1)  # validation renders every k-th frame of every trajectory
    # Start from these weights instead of a random init: a lyra decoder .safetensors path, or "shipped" (the
    # package's decoder). Its sha256 joins the run's name; the architecture must be the configured one, except
    # for rendering-only fields (near/far keep their meaning: the weights see the same rays).
    init_weights: str | None = None

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not self.stages:
            raise ValueError("at least one training stage is required")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for s in self.stages:
            s.spec()  # StageSpec's own checks (input_frames = 8k+1, ...)
        self.decoder_config()
        return self

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def decoder_config(self) -> DecoderConfig:
        from lyra_ops.decoder import DecoderConfig

        return DecoderConfig.preset(self.decoder, **self.decoder_overrides)

    def stage_at(self, step: int) -> tuple[int, StageConfig]:
        """(index, stage) that trains global step ``step`` (0-based)."""
        end = 0
        for i, s in enumerate(self.stages):
            end += s.steps
            if step < end:
                return i, s
        return len(self.stages) - 1, self.stages[-1]

    def stage_ends(self) -> list[int]:
        """Global step count at the end of each stage."""
        out, end = [], 0
        for s in self.stages:
            end += s.steps
            out.append(end)
        return out


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # CI-sized: tiny decoder, a few steps of one view, then a prune stage; for the smoke store (96x160, 9 frames).
    "smoke": {
        "decoder": "tiny",
        "stages": [
            {"name": "views_1", "steps": 4, "targets": 2},
            {"name": "prune", "steps": 2, "targets": 2, "prune_ratio": 0.8, "opacity_weight": 0.1},
        ],
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "checkpoint_every": 2,
    },
    # CPU default (issue 13): the CPU Gaussian layout of lyra_ops.decoder.CPU_LAYOUT, whole 25-frame
    # trajectories as input, then 1-3 views; metric depth supervision from the SDG's warped input depth
    # (rendered depth and, per Gaussian, the input frame's depth). No prune stage: on CPU its steps buy more
    # as learning steps, and exports prune on request.
    "default": {
        "decoder": "small",
        "stages": [
            {"name": "views_1", "steps": 800, "targets": 2},
            {"name": "multi_view", "steps": 1200, "input_views": 3, "random_views": True, "targets": 2,
             "frame_sampling": "exponential"},
        ],
        "optim": {"lr": 5e-4, "warmup_steps": 50},
        "loss": {"depth": 0.05, "depth_mode": "log_l1", "gaussian_depth": 0.2},
        "val_scenes": 4,
        "checkpoint_every": 50,
        "torch_threads": 2,
        "eval_frame_stride": 4,
    },
    # Dynamic (issue 16; Lyra's stages 8-9 start from its static stage 6): the shipped static decoder plus the
    # zero-initialised time embedding, trained on a `dynamic` store with one query time per sample: the input video
    # and 1-3 of the six forward paths as inputs, 4 of the twelve paths (flipped twins included) as targets there.
    # Gaussians of the query frame and of the other keyframes (what other times saw), so the time embedding has
    # something to decide: which of those still hold at the query time.
    "dynamic": {
        "decoder": "small",
        "decoder_overrides": {"time_embedding": True, "time_frames": "query+keyframes"},
        "init_weights": "shipped",
        "stages": [
            {"name": "dynamic", "steps": 400, "input_views": 3, "random_views": True, "targets": 4,
             "dynamic": True},
        ],
        "optim": {"lr": 2e-4, "warmup_steps": 20, "schedule": "cosine"},
        "loss": {"depth": 0.05, "depth_mode": "log_l1", "gaussian_depth": 0.2},
        "val_scenes": 4,
        "checkpoint_every": 50,
        "torch_threads": 2,
        "eval_frame_stride": 4,
    },
    # Lyra's static stages 1-7 (spec 5.4, per-stage steps) for a paper-preset store (704x1280, 121 frames).
    "paper": {
        "decoder": "paper",
        "stages": [
            {"name": "res_176_320_views_17", "steps": 10000, "scale": 4, "input_frames": 17, "targets": 17},
            {"name": "res_176_320_views_49", "steps": 2500, "scale": 4, "input_frames": 49, "targets": 49},
            {"name": "res_352_640_views_49", "steps": 2500, "scale": 2, "input_frames": 49, "targets": 49},
            {"name": "res_704_1280_views_49", "steps": 2500, "input_frames": 49, "targets": 49},
            {"name": "res_704_1280_views_121", "steps": 57500, "targets": 9},
            {"name": "multi_6", "steps": 7000, "input_views": 6, "random_views": True, "targets": 9,
             "frame_sampling": "exponential"},
            {"name": "multi_6_prune", "steps": 1000, "input_views": 6, "random_views": True, "targets": 9,
             "frame_sampling": "exponential", "prune_ratio": 0.8, "opacity_weight": 0.1},
        ],
        "val_scenes": 16,
        "checkpoint_every": 100,
        "device": "cuda",
        "backend": "gsplat",
        "torch_threads": None,
        "eval_frame_stride": 4,
    },
}


def build_train_config(preset: str = "smoke", overrides: dict[str, Any] | None = None, *,
                       source: str = "train config") -> TrainConfig:
    """A training preset plus overrides (nested dicts; ``stages`` replaces the whole list), validated."""
    if preset not in TRAIN_PRESETS:
        raise LyraConfigError(f"unknown training preset {preset!r}; valid: {', '.join(TRAIN_PRESETS)}")
    try:
        return TrainConfig.model_validate(merge(TRAIN_PRESETS[preset], overrides or {}))
    except ValidationError as err:
        raise LyraConfigError(format_errors(err, source, TrainConfig)) from None


# ------------------------------------------------------------------------------------------------------------
# Teacher fine-tuning (lyra train-teacher)
# ------------------------------------------------------------------------------------------------------------


class TeacherUNetConfig(Section):
    channels: list[int] = Field(default_factory=lambda: [48, 64, 96])
    layers_per_block: int = Field(1, ge=1)
    norm_groups: int = Field(16, ge=1)
    patch: int = Field(4, ge=1)

    def spec(self) -> TinyUNetSpec:
        from lyra_pipeline.backends.tiny_teacher import TinyUNetSpec

        return TinyUNetSpec(tuple(self.channels), self.layers_per_block, self.norm_groups, self.patch)


class DiffusersTeacherConfig(Section):
    """A local diffusers video checkpoint whose GEN3C conditioning is fine-tuned (Wan 2.x, flow matching)."""

    model_path: str
    conditioned_path: str | None = None  # continue from a fine-tuned conditioned transformer
    lora_rank: int = Field(0, ge=0)  # > 0: LoRA (peft) on the attention projections as well
    guidance: float = Field(0.0, ge=0)  # guidance when sampling held-out videos


class TeacherTrainConfig(Section):
    """Everything that determines a teacher training run (its hash names the run).

    ``model: tiny`` trains the pixel-space tiny teacher (all weights, ``unet``) on crops; ``model: diffusers``
    trains the widened patch embedding (+ LoRA) of ``diffusers.model_path`` on whole videos, ``batch`` videos
    per step."""

    seed: int = 7
    model: Literal["tiny", "diffusers"] = "tiny"
    diffusers: DiffusersTeacherConfig | None = None
    unet: TeacherUNetConfig = TeacherUNetConfig()
    steps: int = Field(ge=1)
    batch: int = Field(8, ge=1)  # crops per step
    # Sampling streams the batch is split into (evenly): a distributed job's ranks take whole streams, so a run
    # with S streams gives the same weights on 1..S processes. More streams than 1 change the sampling.
    streams: int = Field(1, ge=1)
    crop: int = Field(64, ge=8)  # square training crops (the UNet is convolutional: it samples full frames)
    hole_crops: float = Field(0.5, ge=0, le=1)  # share of crops centred on a disoccluded pixel
    lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    shift: float = Field(1.0, gt=0)  # timestep shift, used in training and sampling
    prediction: Literal["sample", "velocity"] = "sample"  # tiny teacher's output: clean frame, or velocity
    logit_normal: bool = True  # SD3-style noise-level density (else uniform)
    sampling_steps: int = Field(10, ge=1)  # Euler steps when the teacher generates
    val_scenes: int = Field(2, ge=0)
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    device: str = "cpu"
    torch_threads: int | None = Field(2, ge=1)
    eval_frame_stride: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> TeacherTrainConfig:
        if self.model == "diffusers" and self.diffusers is None:
            raise ValueError("model 'diffusers' needs a diffusers section with model_path (a local Wan pipeline "
                             "folder)")
        if self.batch % self.streams:
            raise ValueError(f"batch {self.batch} must be a multiple of streams {self.streams}")
        if len(self.unet.channels) < 2:
            raise ValueError("unet.channels needs at least two levels")
        if any(c % self.unet.norm_groups for c in self.unet.channels):
            raise ValueError(f"unet.channels {self.unet.channels} must be multiples of unet.norm_groups "
                             f"{self.unet.norm_groups}")
        if self.crop % self.unet.spec().multiple:
            raise ValueError(f"crop {self.crop} must be a multiple of {self.unet.spec().multiple} (the UNet's "
                             "down-sampling)")
        return self


TEACHER_PRESETS: dict[str, dict[str, Any]] = {
    # CI-sized (smoke store, 96x160): a few steps of a very small UNet.
    "smoke": {"unet": {"channels": [8, 16], "norm_groups": 4, "patch": 2}, "steps": 6, "batch": 2, "crop": 32,
              "warmup_steps": 2, "lr": 1e-3, "sampling_steps": 3, "val_scenes": 1, "checkpoint_every": 3},
    # The shipped tiny teacher (lyra_pipeline/weights/tiny_teacher), trained on a default-preset oracle store.
    "tiny": {"steps": 3000, "batch": 16, "crop": 64, "checkpoint_every": 250, "val_scenes": 3, "sampling_steps": 8},
}


def build_teacher_config(preset: str = "smoke", overrides: dict[str, Any] | None = None) -> TeacherTrainConfig:
    if preset not in TEACHER_PRESETS:
        raise LyraConfigError(f"unknown teacher preset {preset!r}; valid: {', '.join(TEACHER_PRESETS)}")
    try:
        return TeacherTrainConfig.model_validate(merge(TEACHER_PRESETS[preset], overrides or {}))
    except ValidationError as err:
        raise LyraConfigError(format_errors(err, "teacher config", TeacherTrainConfig)) from None
