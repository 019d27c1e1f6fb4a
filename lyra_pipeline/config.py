"""Run configuration: one validated pydantic tree, named presets, YAML loading with teaching errors."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lyra_ops.errors import LyraConfigError
from lyra_ops.paths import ALL_PATHS, LYRA_PATHS


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ScenesConfig(Section):
    # dynamic: procedural rooms with moving objects, filmed by a moving input camera (section ``dynamic``);
    # video: one monocular video (video_path) with its per-frame poses (poses_path), a dynamic scene
    source: Literal["procedural", "images", "text", "dynamic", "video"] = "procedural"
    num_scenes: int = Field(2, ge=1)
    images_dir: str | None = None  # folder of NAME.png/.jpg + NAME.txt prompts (source=images)
    # source=text: one prompt per line (blank lines and '#' comments skipped); None: seeded template prompts
    prompts_file: str | None = None
    scene_kind: Literal["room"] = "room"
    video_path: str | None = None  # source=video: an mp4/webm file (lyra_pipeline.video_input)
    poses_path: str | None = None  # source=video: its poses, one per frame (.npz / .json, optional times)


class TextToImageConfig(Section):
    """First frames for text-only scenes (``scenes.source: text``): a local diffusers text-to-image pipeline."""

    model_path: str | None = None
    steps: int = Field(20, ge=1)
    guidance: float = Field(4.5, ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    max_text_tokens: int = Field(300, ge=1)


# What text to 3D needs, named in `lyra reconstruct --prompt`'s error (before torch loads) and its help
TEXT_TO_IMAGE_HELP = ("pass --text-to-image DIR (a local diffusers text-to-image pipeline folder: PixArt, SD3, FLUX, "
                      "SDXL or Sana) or --config FILE with a text_to_image section (`lyra example-config "
                      "text_prompts --out FILE` writes one to edit)")


class VideoConfig(Section):
    """Video format. Frames and size follow the latent grid: T = 8k+1 frames (8x temporal compression, causal
    first frame) and H, W multiples of 16 (8x spatial compression, then the decoder's 2x2 patches)."""

    height: int = Field(96, ge=16)
    width: int = Field(160, ge=16)
    num_frames: int = Field(9, ge=9)
    hfov_deg: float = Field(65.0, gt=1.0, lt=179.0)

    @model_validator(mode="after")
    def _latent_grid(self) -> VideoConfig:
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be multiples of 16 (latent grid /8, decoder patch 2), got "
                             f"{self.height}x{self.width}")
        if (self.num_frames - 1) % 8:
            lo = (self.num_frames - 1) // 8 * 8 + 1
            raise ValueError(f"num_frames must be 8k+1 (latent frames 1 + (T-1)/8), got {self.num_frames}; "
                             f"nearest valid: {lo} or {lo + 8}")
        return self


class DynamicConfig(Section):
    """Dynamic scenes (``scenes.source: dynamic``, Lyra's video -> 4D variant; ``lyra_ops.dynamic``): the input is a
    video, every novel path is offset from the input camera frame by frame, at the input's time steps."""

    moving: int = Field(2, ge=0)  # objects set in motion per procedural scene (translate, rotate or bounce)
    camera_speed: float = Field(0.15, ge=0)  # drift of the procedural input camera over the clip (scene units)
    flip: bool = True  # flip supervision: every path also generated from the time-reversed input ("<name>_flip")


class TrajectoryConfig(Section):
    names: list[str] = Field(default_factory=lambda: list(LYRA_PATHS))
    distance_factor: float = Field(1.0, gt=0)
    center_depth: float = Field(1.0, gt=0)
    lookat: Literal["textbook", "lyra"] = "textbook"
    custom: str | None = None  # .npz/.json path; replaces `names` with a single trajectory named "custom"
    pose_scale: float = Field(1.0, gt=0)
    # Which frames of a custom path are kept: "all" (the path as given, the default), "clip" (its first
    # video.num_frames), N (N evenly spaced frames) or "stride K" (every K-th); a count that is not 8k+1 holds the
    # last pose to the next 8k+1. Lyra's named paths have video.num_frames frames whatever this says.
    frames: str | int = "all"

    @field_validator("frames")
    @classmethod
    def _frames(cls, value: str | int) -> str | int:
        from lyra_ops.trajectories import parse_frames

        parse_frames(value)  # raises naming the expected forms
        return value

    @field_validator("names")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        if not names:
            raise ValueError("at least one trajectory name is required")
        for n in names:
            if n not in ALL_PATHS:
                close = difflib.get_close_matches(n, list(ALL_PATHS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown trajectory {n!r}{hint}; valid: {sorted(ALL_PATHS)}")
        if len(set(names)) != len(names):
            raise ValueError(f"trajectory names must be unique, got {names}")
        return names


class DepthConfig(Section):
    """First-frame depth: estimator backend and Lyra's clean-up / depth-edge filter."""

    backend: Literal["procedural", "constant", "planar", "file", "transformers"] = "procedural"  # file: NAME.depth.npy
    model_path: str | None = None  # transformers depth-estimation folder (backend "transformers")
    kind: Literal["auto", "metric", "relative"] = "auto"  # auto: from the model config (depth_estimation_type)
    relative_near: float = Field(0.5, gt=0)  # relative models: disparity mapped to z-depth in [near, far]
    relative_far: float = Field(20.0, gt=0)
    device: str = "cpu"
    max_depth: float = Field(100.0, gt=0)  # invalid/sky/NaN depth -> max_depth (Lyra: 100)
    edge_window: int = Field(5, ge=3)
    # Lyra's (max-min)/mean < 0.05 over 5x5 pixels, defined at 704 rows. Relative depth change across a window
    # grows as the image shrinks, so the threshold is scaled by edge_reference_height / H: the same angular
    # criterion at every resolution (at 176 rows the plain 0.05 would mark whole floors as "edges").
    edge_threshold: float = Field(0.05, gt=0)
    edge_reference_height: int | None = Field(704, ge=1)  # None: the threshold as given at every resolution
    constant_value: float = Field(2.0, gt=0)  # fallback backends' depth scale


class WarpConfig(Section):
    depth_weight_scale: float = Field(50.0, gt=0)


class MaskConfig(Section):
    """Conservative mask refinement (Lyra's foreground masking)."""

    refine: bool = True
    threshold: float = Field(0.02, ge=0)
    # Seam mesh grid = frame downsampled by this factor (Lyra: 4 at 704 rows, i.e. a 176-row mesh).
    # None: max(1, H // 176), the same mesh density in angle at every resolution.
    downsample: int | None = Field(None, ge=1)


class GeneratorConfig(Section):
    """Teacher video backend. ``oracle``: exact renders of procedural scenes; ``warp_only``: the no-model
    baseline; ``tiny``: the shipped pixel-space camera-conditioned diffusion teacher (or a folder made by
    ``lyra train-teacher``); ``diffusers``: a local diffusers video checkpoint (Wan 2.x T2V or I2V, CogVideoX
    1.0, saved with ``save_pretrained``) with GEN3C conditioning; see README "Real checkpoints"."""

    backend: Literal["oracle", "warp_only", "tiny", "diffusers"] = "oracle"
    # diffusers: pipeline folder (model_index.json, transformer/, vae/, ...); tiny: teacher folder (None: shipped)
    model_path: str | None = None
    conditioned_path: str | None = None  # fine-tuned GEN3C-widened transformer folder (default: zero-widened base)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    steps: int = Field(35, ge=1)  # sampler steps (Lyra: 35); tiny: its teacher.json's unless set
    guidance: float = Field(1.0, ge=0)  # eps_c + g (eps_c - eps_u) (Lyra's SDG: 1); 0 skips the unconditional pass
    negative_prompt: str | None = None  # None: a short list of low-quality-video descriptors
    max_text_tokens: int = Field(512, ge=1)
    cpu_offload: bool = False  # diffusers enable_model_cpu_offload (small-memory GPUs)
    vae_tiling: bool = False
    vae_slicing: bool = False
    # Long paths (trajectories.frames other than "clip") with the tiny / diffusers teachers, generated clip by
    # clip: frames each clip shares with the one before, cross-faded (lyra_pipeline.long_paths); 1 = chained.
    clip_overlap: int = Field(4, ge=1)


class LatentsConfig(Section):
    """Latents of the teacher video, the decoder's input: (C, 1 + (T-1)/8, H/8, W/8) per trajectory.

    ``patchify`` is the embedded lossless pixel space-to-depth encoder (1536 channels); VAE encoders of the
    video model come with the diffusers backends. Stored as ``dtype``: float16 is exact for patchify latents
    after 8-bit re-quantisation (|error| < 1/510)."""

    encoder: Literal["patchify", "vae"] = "patchify"  # vae: the diffusers generator's own latents
    dtype: Literal["float16", "float32"] = "float16"


class ComputeConfig(Section):
    """How stages use the machine (not part of any content key: it never changes results)."""

    torch_threads: int | None = Field(1, ge=1)  # intra-op threads per task; None: torch's default (all cores)
    # Prefect task granularity: "scene" = one task runs every stage of a scene (least orchestration overhead);
    # "stage" = one task per stage per scene (per-stage task runs in the Prefect UI).
    tasks: Literal["scene", "stage"] = "scene"


class RunConfig(Section):
    """Everything that determines a dataset; its sections feed the content keys of the stages they drive."""

    seed: int = 0
    scenes: ScenesConfig = ScenesConfig()
    text_to_image: TextToImageConfig = TextToImageConfig()
    video: VideoConfig = VideoConfig()
    trajectories: TrajectoryConfig = TrajectoryConfig()
    dynamic: DynamicConfig = DynamicConfig()
    depth: DepthConfig = DepthConfig()
    warp: WarpConfig = WarpConfig()
    mask: MaskConfig = MaskConfig()
    generator: GeneratorConfig = GeneratorConfig()
    latents: LatentsConfig = LatentsConfig()
    compute: ComputeConfig = ComputeConfig()

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.scenes.source == "text":
            if not self.text_to_image.model_path:
                raise ValueError("text_to_image.model_path is required for scenes.source 'text' (a local diffusers "
                                 "text-to-image pipeline folder makes the first frames)")
            if self.depth.backend in ("procedural", "file"):
                raise ValueError(f"depth.backend {self.depth.backend!r} cannot serve generated first frames; use "
                                 "'transformers', 'planar' or 'constant'")
            if self.generator.backend == "oracle":
                raise ValueError("generator.backend 'oracle' renders procedural scenes only")
        if self.scenes.source == "video":
            if not (self.scenes.video_path and self.scenes.poses_path):
                raise ValueError("scenes.source 'video' needs scenes.video_path (mp4/webm) and scenes.poses_path "
                                 "(.npz/.json, one pose per frame)")
            if self.depth.backend in ("procedural", "file"):
                raise ValueError(f"depth.backend {self.depth.backend!r} cannot serve a user video; use "
                                 "'transformers', 'planar' or 'constant'")
            if self.generator.backend == "oracle":
                raise ValueError("generator.backend 'oracle' renders procedural scenes only; use 'warp_only', 'tiny' "
                                 "or 'diffusers' for a video")
        if self.is_dynamic:
            if self.trajectories.custom:
                raise ValueError("trajectories.custom is not supported for dynamic scenes yet: their paths are "
                                 "offsets of the input camera (trajectories.names)")
            if self.scenes.source == "dynamic" and self.depth.backend not in ("procedural", "constant", "planar"):
                raise ValueError(f"depth.backend {self.depth.backend!r}: procedural dynamic scenes have exact depth "
                                 "('procedural')")
            if self.latents.encoder != "patchify":
                raise ValueError("dynamic scenes store patchify latents (latents.encoder 'patchify')")
        if self.generator.clip_overlap >= self.video.num_frames:
            raise ValueError(f"generator.clip_overlap {self.generator.clip_overlap}: expected fewer frames than a clip "
                             f"(video.num_frames {self.video.num_frames})")
        if self.scenes.source == "images" and not self.scenes.images_dir:
            raise ValueError("scenes.images_dir is required when scenes.source is 'images'")
        if self.scenes.source == "images" and self.depth.backend == "procedural":
            raise ValueError("depth.backend 'procedural' needs procedural scenes; use 'constant', 'planar' "
                             "or 'file' for images")
        if self.depth.backend == "transformers" and not self.depth.model_path:
            raise ValueError("depth.model_path is required for depth.backend 'transformers'")
        if self.depth.relative_near >= self.depth.relative_far:
            raise ValueError("depth.relative_near must be smaller than depth.relative_far")
        if self.scenes.source == "procedural" and self.depth.backend == "file":
            raise ValueError("depth.backend 'file' reads NAME.depth.npy beside input images; procedural scenes "
                             "have exact depth ('procedural')")
        if self.generator.backend == "diffusers" and not self.generator.model_path:
            raise ValueError("generator.model_path is required for generator.backend 'diffusers' (a local "
                             "diffusers pipeline folder)")
        if self.latents.encoder == "vae" and self.generator.backend != "diffusers":
            raise ValueError("latents.encoder 'vae' stores the diffusers generator's latents; use 'patchify' with "
                             f"generator.backend {self.generator.backend!r}")
        if self.scenes.source == "images" and self.generator.backend == "oracle":
            raise ValueError("generator.backend 'oracle' renders procedural scenes only; use 'warp_only' "
                             "for images")
        return self

    @property
    def trajectory_names(self) -> list[str]:
        if self.trajectories.custom:
            return ["custom"]
        names = list(self.trajectories.names)
        if self.is_dynamic and self.dynamic.flip:
            names += [f"{n}{FLIP_SUFFIX}" for n in self.trajectories.names]
        return names

    @property
    def is_dynamic(self) -> bool:
        """Dynamic scenes: a video in (procedural ``dynamic`` or a user ``video``), time-synchronised paths."""
        return self.scenes.source in DYNAMIC_SOURCES


DYNAMIC_SOURCES = ("dynamic", "video")  # scene sources whose input is a video
FLIP_SUFFIX = "_flip"  # a dynamic path generated from the time-reversed input (stored in time order)

PRESETS: dict[str, dict[str, Any]] = {
    # CI-sized: 2 scenes x 6 paths x 9 frames at 96x160.
    "smoke": {},
    # Laptop-sized default: 6 scenes x 6 paths x 25 frames at 176x320 (a quarter of Lyra's 704x1280).
    "default": {"scenes": {"num_scenes": 6}, "video": {"height": 176, "width": 320, "num_frames": 25}},
    # Lyra-1's SDG format: 121 frames at 704x1280 (needs a GPU-sized machine for the real generator).
    "paper": {"scenes": {"num_scenes": 8}, "video": {"height": 704, "width": 1280, "num_frames": 121}},
    # Dynamic scenes (moving objects, moving input camera): CI-sized, 2 paths + their flipped twins.
    "dynamic-smoke": {"scenes": {"source": "dynamic", "num_scenes": 2},
                      "trajectories": {"names": ["left", "zoom_out"]}},
    # Dynamic, laptop-sized: the default format, Lyra's six paths + six flipped.
    "dynamic": {"scenes": {"source": "dynamic", "num_scenes": 6},
                "video": {"height": 176, "width": 320, "num_frames": 25}},
}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _valid_keys(model: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """Field names valid at ``path`` in the config tree (for 'did you mean' hints); list indices are skipped."""
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if get_origin(ann) is list:
            ann = get_args(ann)[0]
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def format_errors(err: ValidationError, source: str, root: type[BaseModel] | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(root or RunConfig, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
            lines.append(f"unknown config key {key!r}{hint} (valid keys here: {', '.join(valid)})")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return f"{source}: invalid configuration:\n  " + "\n  ".join(lines)


def build_config(
    preset: str = "smoke", overrides: dict[str, Any] | None = None, *, source: str = "config"
) -> RunConfig:
    """Preset, then file/CLI overrides (nested dicts), validated into a ``RunConfig``."""
    if preset not in PRESETS:
        close = difflib.get_close_matches(preset, list(PRESETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LyraConfigError(f"unknown preset {preset!r}{hint}; valid presets: {', '.join(PRESETS)}")
    data = merge(PRESETS[preset], overrides or {})
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise LyraConfigError(format_errors(err, source)) from None


def load_config_file(path: str | Path) -> tuple[str | None, dict[str, Any]]:
    """Read a YAML config file: returns (preset named in it or None, the override tree)."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise LyraConfigError(f"{p}: config file not found") from None
    except IsADirectoryError:
        raise LyraConfigError(f"{p}: is a folder; --config expects a YAML file of config sections") from None
    except UnicodeDecodeError:
        raise LyraConfigError(f"{p}: not UTF-8 text; --config expects a YAML file of config sections") from None
    except OSError as exc:
        raise LyraConfigError(f"{p}: cannot read the config file ({exc.strerror or exc}); expected a readable "
                              "YAML file") from None
    except yaml.YAMLError as exc:
        raise LyraConfigError(f"{p}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(doc, dict):
        raise LyraConfigError(f"{p}: top level must be a mapping of config sections, got {type(doc).__name__}")
    preset = doc.pop("preset", None)
    return preset, doc


def edge_threshold(config: RunConfig) -> float:
    """Depth-edge threshold at this run's resolution (see ``DepthConfig.edge_threshold``)."""
    ref = config.depth.edge_reference_height
    return config.depth.edge_threshold * (ref / config.video.height if ref is not None else 1.0)


def mesh_downsample(config: RunConfig) -> int:
    """Seam-mesh downsampling factor at this run's resolution (see ``MaskConfig.downsample``)."""
    return config.mask.downsample or max(1, config.video.height // 176)


def section_dict(config: RunConfig, *names: str) -> dict[str, Any]:
    """JSON-ready dict of the named sections (``seed`` allowed), used in stage content keys."""
    dump = config.model_dump(mode="json")
    return {n: dump[n] for n in names}
