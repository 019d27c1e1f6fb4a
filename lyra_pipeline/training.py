"""Decoder self-distillation on a store: config, dataset index and split, checkpoints, the training loop.

A training run lives under ``train/<run>/`` in the store (see storage_layout.md). Its name is a content hash of
the training config and the dataset fingerprint (every done ``latents`` unit with its key), so re-running on an
unchanged store resumes or does nothing, and a grown dataset starts a new run. Progress is made in chunks of
``checkpoint_every`` steps; each chunk ends with a checkpoint (safetensors weights + optimizer state + sampler
RNG, ``state.json`` written last with the files' sha256) from which a killed run resumes to the same weights
as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lyra_ops.cameras import Cameras
from lyra_ops.decoder import DecoderConfig, LatentGaussianDecoder, load_decoder_state
from lyra_ops.distill import (
    INFERENCE,
    DistillBatch,
    ViewData,
    batch_loss,
    batch_to,
    build_batch,
    build_dynamic_batch,
    decode_gaussians,
    render_batch,
    sample_input_frames,
    sample_targets,
    sample_views,
    warmup_lambda,
    with_input_target,
)
from lyra_ops.errors import LyraConfigError, LyraInputError, LyraStorageError
from lyra_ops.gaussians import Gaussians
from lyra_ops.latents import PixelPatchifyEncoder
from lyra_ops.losses import LossWeights, make_lpips
from lyra_ops.scenes import make_scene
from lyra_ops.seeding import derive_seed
from lyra_pipeline import runner
from lyra_pipeline.config import FLIP_SUFFIX
from lyra_pipeline.distributed import DistContext
from lyra_pipeline.runner import (
    Recipe,
    StepResult,
    TrainState,
    checkpoint_steps,
    load_state,
    run_params,
    sha256_hex,
    stream_generators,
)
from lyra_pipeline.storage import RunStore, content_key
from lyra_pipeline.train_config import (  # noqa: F401 - re-exported
    TRAIN_PRESETS,
    LossConfig,
    OptimConfig,
    StageConfig,
    TrainConfig,
    build_train_config,
)

log = logging.getLogger(__name__)
TRAIN_FORMAT_VERSION = 1
LATEST = "train/latest.json"
INPUT_TIMES = "input/video/times"  # the array only dynamic scenes (an input video) have


# ------------------------------------------------------------------------------------------------------------
# Config (lyra_pipeline.train_config, re-exported here)
# ------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------
# Dataset: what the store holds, the split, per-view data
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetIndex:
    """Scenes with finished latents (and their trajectories), the fingerprint of those units, the format."""

    scenes: dict[str, list[str]]
    fingerprint: str
    height: int
    width: int
    frames: int
    encoder: str
    dynamic: bool = False  # the scenes have an input video (a dynamic store)


def index_dataset(store: RunStore) -> DatasetIndex:
    """Every (scene, trajectory) whose ``generate`` and ``latents`` stages are done; raises on an empty store."""
    done = store.done_keys()
    units = sorted((s, t) for (s, t, stage) in done if stage == "latents" and (s, t, "generate") in done)
    if not units:
        raise LyraInputError(
            f"{store.url}: no scene has finished latents (manifest stage 'latents' done); generate a dataset "
            f"first, e.g. `lyra run --store {store.url}`"
        )
    scenes: dict[str, list[str]] = {}
    for s, t in units:
        scenes.setdefault(s, []).append(t)
    # A unit's teacher-frame depth (stage video_depth) joins the fingerprint when done: it changes the supervision.
    blob = json.dumps([[s, t, done[(s, t, "generate")], done[(s, t, "latents")],
                        *([done[(s, t, "video_depth")]] if (s, t, "video_depth") in done else [])] for s, t in units])
    first, traj = units[0]
    frames = store.scene_group(first)[f"trajectories/{traj}/teacher/rgb"]
    latents = store.scene_group(first)[f"trajectories/{traj}/latents"]
    t, _, h, w = frames.shape
    dynamic = is_dynamic_scene(store, first)
    return DatasetIndex(scenes, hashlib.sha256(blob.encode()).hexdigest()[:16], int(h), int(w), int(t),
                        str(latents.attrs.get("encoder", "patchify")), dynamic)


def scene_trajectories(store: RunStore, scene_id: str) -> list[str]:
    """Trajectories of ``scene_id`` whose teacher frames and latents are done (one clear error for an unknown
    scene, naming the store's scenes)."""
    names = index_dataset(store).scenes.get(scene_id, [])
    if not names:
        known = store.scene_ids()
        hint = f"; scenes: {', '.join(known[:20])}" if known else "; the store has no scenes"
        raise LyraInputError(f"{store.url}: scene {scene_id!r} has no trajectory with finished teacher frames and "
                             f"latents{hint}")
    return names


def split_scenes(scene_ids: list[str], val_scenes: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) by scene: the ``val_scenes`` ids with the smallest seeded hash are held out. Independent of
    the order scenes were listed in; at least one scene is left for training."""
    if val_scenes >= len(scene_ids):
        raise LyraConfigError(
            f"train.val_scenes = {val_scenes} leaves no training scene: the dataset has {len(scene_ids)} scene(s) "
            "with finished latents; lower val_scenes or generate more scenes"
        )
    ranked = sorted(scene_ids, key=lambda s: (derive_seed(seed, "val-split", s), s))
    val = sorted(ranked[:val_scenes])
    return sorted(set(scene_ids) - set(val)), val


class ViewCache:
    """Reads one trajectory of one scene from the store as :class:`ViewData` (LRU-cached)."""

    def __init__(self, store: RunStore, size: int = 32) -> None:
        self.store, self.size = store, size
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._input_frames: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._video_depth: set[tuple[str, str]] | None = None  # units whose stage video_depth is done

    def _has_video_depth(self, scene_id: str, trajectory: str) -> bool:
        if self._video_depth is None:
            self._video_depth = {(s, t) for (s, t, stage) in self.store.done_keys() if stage == "video_depth"}
        return (scene_id, trajectory) in self._video_depth

    def _cached(self, key: Any, load: Callable[[], Any], cache: OrderedDict | None = None) -> Any:
        """``load()``'s value under ``key``, read once and kept among the ``size`` most recently used of ``cache``
        (default: the views')."""
        cache = self._cache if cache is None else cache
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        value = cache[key] = load()
        if len(cache) > self.size:
            cache.popitem(last=False)
        return value

    def get(self, scene_id: str, trajectory: str) -> ViewData:
        return self._cached((scene_id, trajectory), lambda: self._read(scene_id, trajectory))

    def _read(self, scene_id: str, trajectory: str) -> ViewData:
        base = f"trajectories/{trajectory}"

        def arr(name: str) -> torch.Tensor:
            return torch.from_numpy(self.store.read_array(scene_id, f"{base}/{name}"))

        frames = arr("teacher/rgb")
        _, _, h, w = frames.shape
        cameras = Cameras(arr("cameras/c2w").float(), arr("cameras/K").float(), int(h), int(w))
        warped = arr("warp/depth").float()
        known = torch.where(arr("refine/mask").bool() & (warped > 0), warped, 0.0)
        # Depth supervision: the teacher frames' own depth (stage video_depth, Lyra's ViPE) where the store
        # has it, else the warped input depth on the refined mask.
        depth = arr("video_depth/depth").float() if self._has_video_depth(scene_id, trajectory) else known
        return ViewData(frames=frames, cameras=cameras, latents=arr("latents"), depth=depth, depth_valid=depth > 0,
                        known_depth=known)

    def input_frame(self, scene_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A static scene's input frame as the decoder's render settings read it: its image (3,H,W) float in
        [0,1] (``input/rgb``) and its z-depth (H,W) at every pixel (``depth/depth``, the depth stage's)."""
        def load() -> tuple[torch.Tensor, torch.Tensor]:
            rgb = torch.from_numpy(self.store.read_array(scene_id, "input/rgb")).float() / 255.0
            return rgb, torch.from_numpy(self.store.read_array(scene_id, "depth/depth")).float()

        # kept apart from the views: callers size the cache to a scene's trajectories
        return self._cached(scene_id, load, self._input_frames)

    def input_view(self, scene_id: str) -> tuple[ViewData, torch.Tensor]:
        """A dynamic scene's input video as a view (frames, cameras, its depth where reliable as both the known
        depth and the depth target; latents None: encoded when a batch is built) and its normalised times (T,)."""
        def load() -> tuple[ViewData, torch.Tensor]:
            def arr(name: str) -> torch.Tensor:
                return torch.from_numpy(self.store.read_array(scene_id, name))

            frames = arr("input/video/rgb")
            _, _, h, w = frames.shape
            cameras = Cameras(arr("input/video/c2w").float(), arr("input/video/K").float(), int(h), int(w))
            depth = torch.where(arr("depth/video/reliable").bool(), arr("depth/video/depth").float(), 0.0)
            view = ViewData(frames=frames, cameras=cameras, depth=depth, depth_valid=depth > 0, known_depth=depth)
            return view, arr(INPUT_TIMES).float()

        return self._cached((scene_id, "<input video>"), load)


def scene_gaussians(model: LatentGaussianDecoder, views: ViewCache, scene_id: str, trajectories: list[str]):
    """Decoder Gaussians of one scene from all given trajectories (Lyra's inference: every path as input)."""
    data = [views.get(scene_id, t) for t in trajectories]
    frames = list(range(int(data[0].frames.shape[0])))
    device = next(model.parameters()).device
    batch = batch_to(build_batch(data, frames, [], INFERENCE, PixelPatchifyEncoder()), device)
    image, depth = views.input_frame(scene_id) if reads_input_frame(model.config) else (None, None)
    with torch.no_grad():
        return decode_gaussians(model, batch, input_image=image, input_depth=depth)


def reads_input_frame(config: DecoderConfig) -> bool:
    """Whether decoding with ``config`` reads the input frame itself (its image and depth: the render settings
    ``input_fit_iters`` and ``input_edge_depth``)."""
    return bool(config.input_stride and (config.input_fit_iters or config.input_edge_depth != "fill"))


def forward_paths(names: list[str]) -> list[str]:
    """The forward paths among a dynamic scene's trajectories (their flipped twins are targets only)."""
    return [n for n in names if not n.endswith(FLIP_SUFFIX)]


def dynamic_inputs(store: RunStore, scene_id: str) -> list[str]:
    """The forward paths of a dynamic scene with finished latents."""
    return forward_paths(scene_trajectories(store, scene_id))


def is_dynamic_scene(store: RunStore, scene_id: str) -> bool:
    """True when the scene has an input video (a procedural dynamic scene or a user video)."""
    return INPUT_TIMES in store.list_arrays(scene_id)


def scene_gaussians_at(model: LatentGaussianDecoder, views: ViewCache, scene_id: str, trajectories: list[str],
                       frame: int) -> Gaussians:
    """A dynamic scene's Gaussians at input frame ``frame`` (time-conditioned decoding, Lyra's dynamic inference:
    the input video and every given forward path as input). A static decoder (no time embedding) gives the
    static decoder applied at that frame. The render settings that read the input frame itself
    (``input_fit_iters``, ``input_edge_depth``) are static-only for now: no input frame is passed here."""
    input_view, times = views.input_view(scene_id)
    device = next(model.parameters()).device
    batch = build_dynamic_batch(input_view, [views.get(scene_id, t) for t in trajectories], [], frame, times,
                                PixelPatchifyEncoder(), model.config.background)
    with torch.no_grad():
        return decode_gaussians(model, batch_to(batch, device))


def render_view(gaussians, view: ViewData, frames: list[int], backend: str = "torch", background: str = "white",
                behind: torch.Tensor | None = None):
    """Render ``gaussians`` at ``frames`` of one trajectory: (renders in [0,1] on the CPU, teacher frames).
    ``background``: the decoder's (``DecoderConfig.background``), taken from the view's first frame; ``behind``:
    an explicit RGB (3,) instead (a dynamic scene's: the input frame of the decoded time)."""
    batch = build_batch([view], list(range(int(view.frames.shape[0]))), frames, INFERENCE, PixelPatchifyEncoder(),
                        background)
    if behind is not None:
        batch = replace(batch, background=behind)
    with torch.no_grad():
        return render_batch(gaussians, batch, backend=backend).rgb.clamp(0, 1).cpu(), batch.rgb


def procedural_world(store: RunStore, scene_id: str):
    """The exact procedural scene behind ``scene_id`` (its ground truth), or None for image/text scenes."""
    record = next((r for r in store.read_prompts() if r["scene_id"] == scene_id), None)
    return make_scene(int(record["seed"])) if record and record["source"] == "procedural" else None


# ------------------------------------------------------------------------------------------------------------
# Runs and checkpoints
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainRun:
    """A training run: its name, config, the dataset it trains on and its fixed split."""

    name: str
    config: TrainConfig
    fingerprint: str
    train_scenes: list[str]
    val_scenes: list[str]
    height: int
    width: int
    frames: int
    init_sha256: str | None = None  # sha256 of config.init_weights' file when the run starts from weights

    def as_json(self) -> dict[str, Any]:
        return {
            "format_version": TRAIN_FORMAT_VERSION, "name": self.name, "config": self.config.model_dump(mode="json"),
            "dataset_fingerprint": self.fingerprint, "train_scenes": self.train_scenes,
            "val_scenes": self.val_scenes, "height": self.height, "width": self.width, "frames": self.frames,
            "init_sha256": self.init_sha256,
        }  # fmt: skip

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> TrainRun:
        return cls(doc["name"], TrainConfig.model_validate(doc["config"]), doc["dataset_fingerprint"],
                   list(doc["train_scenes"]), list(doc["val_scenes"]), doc["height"], doc["width"], doc["frames"],
                   doc.get("init_sha256"))


# Decoder fields that only change how Gaussians are rendered or kept, not the weights' meaning: a run may start
# from weights trained with other values of these.
INIT_FREE_FIELDS = ("background", "prune_ratio", "gradient_checkpointing", "depth_input", "fuse", "fuse_covered",
                    "input_stride", "input_scale_init", "input_opacity_init", "input_depth_fill", "time_embedding",
                    "time_frames", "input_gate", "input_edges", "input_guard", "input_guard_sigmas",
                    "input_footprint", "input_edge_depth", "input_fit_iters", "input_fit_ridge")
# Modules that weights from before depth_input / input_stride / time_embedding may lack (zero-initialised, or the
# input head, which starts as the input's unprojection)
NEW_MODULES = ("depth_embed.", "input_head.", "input_time_embed.", "target_time_embed.")


def read_init_weights(config: TrainConfig) -> tuple[bytes, str] | None:
    """(bytes, description) of ``config.init_weights`` ("shipped" = the package decoder), or None when unset.
    A missing or unreadable file, or weights of another architecture, raise one ``LyraConfigError`` line."""
    if config.init_weights is None:
        return None
    if config.init_weights == "shipped":
        from lyra_pipeline.shipped import MODEL_FILE, shipped_decoder_dir

        path = shipped_decoder_dir() / MODEL_FILE
    else:
        path = Path(config.init_weights).expanduser()
    if not path.is_file():
        raise LyraConfigError(f"train.init_weights: {path} is not a file (expected a lyra decoder .safetensors or "
                              "'shipped')")
    data = path.read_bytes()
    model = load_decoder_bytes(data, str(path))
    have, want = model.config.to_dict(), config.decoder_config().to_dict()
    diff = {k: (have[k], want[k]) for k in want if k not in INIT_FREE_FIELDS and have[k] != want[k]}
    if diff:
        raise LyraConfigError(f"train.init_weights: {path} holds another decoder architecture than the configured "
                              f"one (file, configured): {diff}")
    return data, str(path)


def plan_run(store: RunStore, config: TrainConfig) -> TrainRun:
    """The run for ``config`` on the store's current dataset, created (run.json) if new, else read back."""
    index = index_dataset(store)
    if index.encoder not in ("patchify", PixelPatchifyEncoder.name):
        raise LyraConfigError(f"{store.url}: latents encoder {index.encoder!r} is not supported for training yet")
    dec = config.decoder_config()
    if dec.latent_channels != PixelPatchifyEncoder.latent_channels:
        raise LyraConfigError(
            f"decoder preset {config.decoder!r} expects {dec.latent_channels}-channel latents but the store holds "
            f"{PixelPatchifyEncoder.latent_channels}-channel patchify latents; set decoder_overrides "
            "latent_channels/plucker_channels (1536 / 48)"
        )
    for s in config.stages:
        if index.height % (16 * s.scale) or index.width % (16 * s.scale):
            raise LyraConfigError(
                f"stage {s.name!r}: scale {s.scale} needs the stored {index.height}x{index.width} frames to be "
                f"multiples of {16 * s.scale}"
            )
        if s.input_frames is not None and s.input_frames > index.frames:
            raise LyraConfigError(
                f"stage {s.name!r}: input_frames {s.input_frames} > {index.frames} frames per trajectory in the store"
            )
    init = read_init_weights(config)
    init_sha = sha256_hex(init[0]) if init else None
    # The resolved decoder config joins the key: a preset whose layout changed in code is another run.
    if any(s.dynamic for s in config.stages) and not index.dynamic:
        raise LyraConfigError(f"{store.url}: dynamic stages need a dynamic store (`lyra run --preset dynamic` or "
                              "--video); this store's scenes have no input video")
    decoder_key = dec.to_dict()
    for key, default in (("time_embedding", False), ("time_frames", "query"), ("input_gate", []),
                         ("input_edges", "learned"), ("input_guard", 0.0), ("input_guard_sigmas", 0.0),
                         ("input_footprint", "ray"), ("input_edge_depth", "fill"), ("input_fit_iters", 0),
                         ("input_fit_ridge", 1.0)):
        if decoder_key[key] == default:  # fields added since runs were published join the key only when set
            decoder_key.pop(key)
    inputs = {"dataset": index.fingerprint, "decoder": decoder_key,
              **({"init_weights": init_sha} if init_sha else {})}
    params = run_params(config, {"batch": 1, "precision": "fp32", "background": "decoder"})
    if params["optim"].get("time_lr_scale") == 1.0:  # joins the key only when set (runs published before it)
        params["optim"].pop("time_lr_scale")
    for stage in params["stages"]:
        for key in ("dynamic", "input_target"):  # join the key only when set (runs published before them)
            if not stage.get(key):
                stage.pop(key, None)
    name = "decoder-" + content_key("train", TRAIN_FORMAT_VERSION, params, inputs)[:12]

    def create() -> dict[str, Any]:
        train, val = split_scenes(sorted(index.scenes), config.val_scenes, config.seed)
        return TrainRun(name, config, index.fingerprint, train, val, index.height, index.width,
                        index.frames, init_sha).as_json()

    return TrainRun.from_json(load_or_create_run(store, name, create))


def load_or_create_run(store: RunStore, name: str, create: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``train/<name>/run.json``: read back when the run exists, else ``create()`` written once (so a run's split
    and config never change under it)."""
    existing = store.read_file(RunStore.train_rel(name, "run.json"))
    if existing is not None:
        return json.loads(existing)
    doc = create()
    store.write_file(RunStore.train_rel(name, "run.json"), json.dumps(doc, indent=2).encode())
    return doc


def read_run_json(store: RunStore, name: str) -> dict[str, Any]:
    data = store.read_file(RunStore.train_rel(name, "run.json"))
    if data is None:
        raise LyraStorageError(f"{store.url}: no training run {name!r} (train/{name}/run.json missing)")
    return json.loads(data)


def load_run(store: RunStore, name: str) -> TrainRun:
    return TrainRun.from_json(read_run_json(store, name))


def new_trainer(config: TrainConfig, init: bytes | None = None, device: str | None = None) -> TrainState:
    """Step-0 training state: the decoder (random, or the weights in ``init`` safetensors bytes), AdamW, the
    scheduler and one sampling generator per sample of the global batch (``config.batch``)."""
    device = device or config.device
    model = LatentGaussianDecoder(config.decoder_config(), seed=config.seed)
    if init is not None:
        load_decoder_state(model, st_load(init), keep_missing=NEW_MODULES)
    model = model.to(device)
    o = config.optim
    optimizer = torch.optim.AdamW(param_groups(model, o), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay,
                                  eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_lambda(o.warmup_steps, o.schedule, config.total_steps, o.min_lr_ratio))
    return TrainState(model, optimizer, scheduler, stream_generators(config.seed, "decoder-sampling", config.batch))


TIME_MODULES = ("input_time_embed.", "target_time_embed.")


def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: every parameter at ``optim.lr``, the time embedding's (:data:`TIME_MODULES`) at
    ``optim.time_lr_scale`` x ``optim.lr`` (one group when the scale is 1, as before it existed)."""
    named = list(model.named_parameters())
    if optim.time_lr_scale == 1.0:
        return [{"params": [p for _, p in named]}]
    timed = [p for n, p in named if n.startswith(TIME_MODULES)]
    rest = [p for n, p in named if not n.startswith(TIME_MODULES)]
    return [{"params": rest}, {"params": timed, "lr": optim.lr * optim.time_lr_scale}]


def initial_weights(run: TrainRun) -> bytes | None:
    """The run's ``init_weights`` bytes, checked against the sha256 recorded when the run was planned."""
    init = read_init_weights(run.config)
    if init is None:
        return None
    if sha256_hex(init[0]) != run.init_sha256:
        raise LyraConfigError(f"train.init_weights: {init[1]} changed since run {run.name} was planned (sha256 "
                              f"{sha256_hex(init[0])[:12]}, run.json {str(run.init_sha256)[:12]}); restore it or "
                              "start a new run")
    return init[0]


def decoder_weights_bytes(model: LatentGaussianDecoder) -> bytes:
    """A decoder checkpoint file: safetensors weights + the decoder config as metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # One metadata key: safetensors writes its metadata map in hash order, so several keys would make the bytes
    # (and the sha256 that names the checkpoint in evaluations) differ between identical saves.
    return st_save(state, metadata={"decoder_config": json.dumps(model.config.to_dict(), sort_keys=True)})


# ------------------------------------------------------------------------------------------------------------
# The training loop (lyra_pipeline.runner runs it)
# ------------------------------------------------------------------------------------------------------------

METRIC_SCHEMA = pa.schema([
    ("run", pa.string()), ("step", pa.int64()), ("stage", pa.string()), ("total", pa.float64()),
    ("mse", pa.float64()), ("lpips", pa.float64()), ("depth", pa.float64()), ("opacity", pa.float64()),
    ("grad_norm", pa.float64()), ("lr", pa.float64()), ("gaussians", pa.int64()), ("views", pa.int32()),
    ("seconds", pa.float64()),
    ("opacity_mean", pa.float64()), ("opacity_above_half", pa.float64()), ("scale_mean", pa.float64()),
    ("distance_mean", pa.float64()), ("alpha_mean", pa.float64()),
])  # fmt: skip
STAT_COLUMNS = ("opacity_mean", "opacity_above_half", "scale_mean", "distance_mean", "alpha_mean")
LOSS_COLUMNS = ("total", "mse", "lpips", "depth", "opacity", "gaussians", "views", *STAT_COLUMNS)


def sample_dynamic(run: TrainRun, views: ViewCache, gen: torch.Generator, stage: StageConfig, scene: str,
                   names: list[str]) -> DistillBatch:
    """One dynamic sample of ``scene`` (spec 5.1, dynamic): a query frame tau ~ U{0..T-1}; inputs: the input
    video and V paths among the forward ones (Lyra's folders 0-5); targets: ``stage.targets`` distinct paths
    among all, flipped twins included (folders 0-11), at tau."""
    spec = stage.spec()
    chosen = sample_views(gen, forward_paths(names), spec)
    frame = int(torch.randint(run.frames, (1,), generator=gen))
    order = torch.randperm(len(names), generator=gen)[: min(spec.targets, len(names))]
    input_view, times = views.input_view(scene)
    batch = build_dynamic_batch(input_view, [views.get(scene, n) for n in chosen],
                                [views.get(scene, names[int(i)]) for i in order], frame, times,
                                PixelPatchifyEncoder(), run.config.decoder_config().background)
    if run.config.background == "random":
        batch = replace(batch, background=torch.rand(3, generator=gen))
    return batch


def sample_batch(run: TrainRun, views: ViewCache, gen: torch.Generator, stage: StageConfig,
                 index: dict[str, list[str]]):
    """Draw one training sample (scene, views, frames) from ``gen`` (a sampling stream) and assemble it."""
    spec = stage.spec()
    scene = run.train_scenes[int(torch.randint(len(run.train_scenes), (1,), generator=gen))]
    if spec.dynamic:
        return sample_dynamic(run, views, gen, stage, scene, index[scene])
    names = sample_views(gen, index[scene], spec)
    inputs, start, end = sample_input_frames(gen, run.frames, spec)
    targets = sample_targets(gen, start, end, spec.targets, spec.frame_sampling)
    if spec.input_target:
        targets = with_input_target(targets, start)
    data = [views.get(scene, n) for n in names]
    batch = build_batch(data, inputs, targets, spec, PixelPatchifyEncoder(), run.config.decoder_config().background)
    if run.config.background == "random":  # drawn last, from the same stream: other samples are unchanged
        batch = replace(batch, background=torch.rand(3, generator=gen))
    return batch


class DecoderRecipe(Recipe):
    """Decoder self-distillation for :mod:`lyra_pipeline.runner`: one sample = one scene's views and frames."""

    metric_schema = METRIC_SCHEMA

    def __init__(self, store: RunStore, run: TrainRun, ctx: DistContext | None = None) -> None:
        cfg = run.config
        self.store, self.run, self.run_name, self.total_steps = store, run, run.name, cfg.total_steps
        self.batch, self.grad_clip, self.torch_threads = cfg.batch, cfg.optim.grad_clip, cfg.torch_threads
        self.device = (ctx or DistContext()).device(cfg.device)
        self.index: dict[str, list[str]] = {}
        self.views = ViewCache(store)
        self.lpips = None
        self.weights = LossWeights()

    def prepare(self) -> None:
        cfg, store = self.run.config, self.store
        self.index = index_dataset(store).scenes
        missing = [s for s in self.run.train_scenes if s not in self.index]
        if missing:
            raise LyraStorageError(f"{store.url}: training scenes {missing[:5]} of run {self.run_name} no longer "
                                   "have finished latents")
        if cfg.loss.lpips > 0 and self.lpips is None:
            if cfg.loss.lpips_weights:
                self.lpips = make_lpips(cfg.loss.lpips_weights, backbone_path=cfg.loss.lpips_backbone,
                                        device=self.device)
            else:
                log.info("LPIPS skipped: no local weights configured (train.loss.lpips_weights)")
        self.weights = LossWeights(mse=cfg.loss.mse, lpips=cfg.loss.lpips if self.lpips is not None else 0.0,
                                   depth=cfg.loss.depth, depth_mode=cfg.loss.depth_mode,
                                   gaussian_depth=cfg.loss.gaussian_depth)

    def new_state(self) -> TrainState:
        return new_trainer(self.run.config, initial_weights(self.run), device=self.device)

    def weights_bytes(self, state: TrainState) -> bytes:
        return decoder_weights_bytes(state.model)

    def load_weights(self, state: TrainState, data: bytes, source: str) -> None:
        load_decoder_state(state.model, {k: v.to(self.device) for k, v in st_load(data).items()})

    def loss(self, state: TrainState, model, streams: list[int]) -> StepResult:
        cfg = self.run.config
        _, stage = cfg.stage_at(state.step)
        (stream,) = streams
        batch = batch_to(sample_batch(self.run, self.views, state.generators[stream], stage, self.index), self.device)
        total, parts, count = batch_loss(
            state.model, batch, stage.spec(), weights=self.weights, lpips=self.lpips, backend=cfg.backend,
            views_per_chunk=cfg.views_per_chunk, forward=model,
            autocast_dtype=torch.bfloat16 if cfg.precision == "bf16" else None,
        )  # fmt: skip
        metrics = {k: float(v.detach()) for k, v in parts.items() if k in LOSS_COLUMNS}
        return StepResult(total, {**metrics, "gaussians": float(count), "views": float(batch.latents.shape[0])})

    def checkpoint_info(self, step: int) -> dict[str, Any]:
        return {"stage": self.run.config.stage_at(max(step - 1, 0))[1].name}

    def keep_checkpoints(self, steps: list[int]) -> set[int]:
        """The newest ``keep_checkpoints`` and the last one of every stage."""
        return set(steps[-self.run.config.keep_checkpoints:]) | set(self.run.config.stage_ends())

    def row(self, step: int, metrics: dict[str, float], seconds: float) -> dict[str, Any]:
        row = {"run": self.run_name, "step": step, "stage": self.run.config.stage_at(step - 1)[1].name,
               "seconds": seconds, **{k: metrics.get(k, math.nan) for k in METRIC_SCHEMA.names
                                      if k not in ("run", "step", "stage", "seconds")}}
        row["gaussians"], row["views"] = int(round(row["gaussians"])), int(round(row["views"]))
        return row

    def log_step(self, step: int, r: dict[str, Any]) -> None:
        if step % 10 == 0:
            log.info("%s step %d/%d [%s] loss %.4f mse %.4f depth %.4f | opacity %.2f (%.0f%% > 0.5) scale %.3f "
                     "distance %.2f alpha %.2f (%.2f s/step)", self.run_name, step, self.total_steps, r["stage"],
                     r["total"], r["mse"], r["depth"], r["opacity_mean"], 100 * r["opacity_above_half"],
                     r["scale_mean"], r["distance_mean"], r["alpha_mean"], r["seconds"])

    def step_error(self, step: int, first: int, exc: Exception) -> Exception:
        stage = self.run.config.stage_at(step - 1)[1].name
        return FloatingPointError(f"run {self.run_name}, step {step} (stage {stage!r}): {exc}; nothing was saved "
                                  f"after checkpoint step {first} — lower optim.lr or check the dataset")


def decoder_recipe(store_url: str, run_name: str, ctx: DistContext | None = None) -> DecoderRecipe:
    store = RunStore(store_url, create=False)
    return DecoderRecipe(store, load_run(store, run_name), ctx)


def load_trainer(store: RunStore, run: TrainRun, step: int) -> TrainState:
    """Restore the exact training state of checkpoint ``step`` (weights, AdamW moments, scheduler, sampler RNG)."""
    return load_state(DecoderRecipe(store, run), step)


def train_until(store_url: str, run_name: str, until_step: int, ctx: DistContext | None = None) -> dict[str, Any]:
    """Train run ``run_name`` from its newest checkpoint up to ``until_step`` steps and checkpoint there (see
    :func:`lyra_pipeline.runner.train_until`; a no-op when a checkpoint at or beyond ``until_step`` exists)."""
    return runner.train_until(decoder_recipe(store_url, run_name, ctx), until_step, ctx)


def chunk_ends(config: TrainConfig) -> list[int]:
    """Step counts at which the flow checkpoints: every ``checkpoint_every`` steps and at every stage end."""
    ends = set(config.stage_ends())
    ends.update(range(config.checkpoint_every, config.total_steps, config.checkpoint_every))
    return sorted(e for e in ends if e > 0)


def read_metrics(store: RunStore, run: str) -> pa.Table:
    return store.read_table_dir(RunStore.train_rel(run, "metrics"), METRIC_SCHEMA)


def final_checkpoint(store: RunStore, run: TrainRun) -> int:
    steps = checkpoint_steps(store, run.name)
    if not steps or steps[-1] < run.config.total_steps:
        raise LyraStorageError(f"{store.url}: run {run.name} has not finished ({steps[-1] if steps else 0} of "
                               f"{run.config.total_steps} steps)")
    return steps[-1]


def write_latest(store: RunStore, run: TrainRun, step: int) -> None:
    """Point ``train/latest.json`` at a finished run's final checkpoint (what reconstruct/export use)."""
    doc = {"run": run.name, "step": step, "checkpoint": RunStore.checkpoint_rel(run.name, step, "model.safetensors")}
    if store.read_file(LATEST) != json.dumps(doc).encode():
        store.write_file(LATEST, json.dumps(doc).encode())


# ------------------------------------------------------------------------------------------------------------
# Loading a decoder for inference
# ------------------------------------------------------------------------------------------------------------


def load_decoder_bytes(data: bytes, source: str, expected: DecoderConfig | None = None) -> LatentGaussianDecoder:
    """A decoder from safetensors bytes written by :func:`save_checkpoint` (config read from its metadata).

    ``expected``: raise when the checkpoint was trained with another architecture. Any unreadable file, or
    weights that do not fit the recorded config, raises ``LyraConfigError`` naming ``source``.
    """
    try:
        tensors = st_load(data)
        meta = _safetensors_metadata(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for garbage
        raise LyraConfigError(f"{source}: not a readable safetensors decoder checkpoint ({exc})") from None
    if "decoder_config" not in meta:
        raise LyraConfigError(f"{source}: safetensors file without 'decoder_config' metadata (not written by lyra)")
    config = DecoderConfig.from_dict(json.loads(meta["decoder_config"]))
    if expected is not None and config != expected:
        diff = {k: (v, expected.to_dict()[k]) for k, v in config.to_dict().items() if expected.to_dict()[k] != v}
        raise LyraConfigError(f"{source}: checkpoint decoder differs from the configured one (checkpoint, "
                              f"configured): {diff}")
    model = LatentGaussianDecoder(config)
    try:
        load_decoder_state(model, tensors)
    except LyraConfigError as exc:
        raise LyraConfigError(f"{source}: {exc}") from None
    return model.eval()


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return dict(header.get("__metadata__") or {})


def load_latest_decoder(store: RunStore) -> tuple[LatentGaussianDecoder, str]:
    """The decoder of ``train/latest.json`` and a description of where it came from."""
    doc = store.read_file(LATEST)
    if doc is None:
        raise LyraStorageError(f"{store.url}: no finished decoder training (train/latest.json missing); run "
                               "`lyra train` first or pass --checkpoint")
    info = json.loads(doc)
    data = store.read_file(info["checkpoint"])
    if data is None:
        raise LyraStorageError(f"{store.url}/{info['checkpoint']} is missing")
    return load_decoder_bytes(data, f"{store.url}/{info['checkpoint']}"), f"{info['run']} step {info['step']}"
