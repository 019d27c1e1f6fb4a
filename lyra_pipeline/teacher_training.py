"""Teacher fine-tuning (GEN3C's conditioning is learned): train a camera-conditioned video model on exact pairs
(warped video + mask -> true frames) from a store generated with the oracle teacher.

A run lives under ``train/<run>/`` like a decoder run (``teacher-<hash of config and dataset>``): ``run.json``
(config, dataset fingerprint, split by scene), ``checkpoints/step-N/`` (weights + AdamW moments + sampler RNG in
safetensors, ``state.json`` last with their sha256), ``metrics/``, ``eval.parquet`` (held-out scenes: the
teacher against the warp-only baseline and the oracle, on disoccluded pixels and on whole frames) and
``model/`` (the finished teacher folder, loadable with ``generator.backend: tiny``). Chunks of
``checkpoint_every`` steps resume from the newest checkpoint to the same weights as an uninterrupted run.

Objective: flow matching (``lyra_ops.teacher``), the training objective of Wan 2.x, in pixel space for the tiny
teacher, whose weights are all trained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torchmetrics.functional.image import structural_similarity_index_measure

from lyra_ops.cameras import Cameras
from lyra_ops.distill import warmup_lambda
from lyra_ops.errors import LyraConfigError, LyraInputError, LyraNonFiniteError, LyraStorageError
from lyra_ops.generation import warp_only_video
from lyra_ops.images import from_signed, from_uint8, to_signed
from lyra_ops.seeding import derive_seed
from lyra_ops.teacher import (
    crop_boxes,
    disoccluded,
    flow_match_noisy,
    flow_match_target,
    psnr_from_sse,
    region_sse,
    sample_sigmas,
    teacher_condition,
)
from lyra_pipeline import runner
from lyra_pipeline.backends.tiny_teacher import (
    build_unet,
    network_output,
    sample_frames,
    write_teacher_folder,
)
from lyra_pipeline.distributed import DistContext
from lyra_pipeline.runner import (
    Recipe,
    StepResult,
    TrainState,
    checkpoint_steps,
    full_tensor,
    load_state,
    run_params,
    stream_generators,
)
from lyra_pipeline.storage import RunStore, content_key
from lyra_pipeline.threads import pin_torch_threads
from lyra_pipeline.train_config import (  # noqa: F401 - re-exported
    TEACHER_PRESETS,
    DiffusersTeacherConfig,
    TeacherTrainConfig,
    TeacherUNetConfig,
    build_teacher_config,
)
from lyra_pipeline.training import load_or_create_run, read_run_json, split_scenes

log = logging.getLogger(__name__)
TEACHER_TRAIN_VERSION = 1


# ------------------------------------------------------------------------------------------------------------
# Config (lyra_pipeline.train_config, re-exported here)
# ------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------
# Training pairs
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairIndex:
    """(scene -> trajectories) with finished warp masks and oracle teacher frames; fingerprint; frame format."""

    scenes: dict[str, list[str]]
    fingerprint: str
    height: int
    width: int
    frames: int


def index_pairs(store: RunStore) -> PairIndex:
    """Every (scene, trajectory) whose ``refine`` and ``generate`` stages are done with the oracle teacher (its
    frames are the exact ground truth); raises when the store has none or another teacher made them."""
    done = store.done_keys()
    units = sorted((s, t) for (s, t, stage) in done if stage == "generate" and (s, t, "refine") in done)
    if not units:
        raise LyraInputError(f"{store.url}: no trajectory has finished teacher frames (manifest stage 'generate' "
                             f"done); generate a dataset first, e.g. `lyra run --store {store.url}`")
    scenes: dict[str, list[str]] = {}
    for s, t in units:
        scenes.setdefault(s, []).append(t)
    first, traj = units[0]
    frames = store.scene_group(first)[f"trajectories/{traj}/teacher/rgb"]
    made_by = frames.attrs.get("generator")
    if made_by != "oracle":
        raise LyraInputError(
            f"{store.url}: scene {first} trajectory {traj}: teacher/rgb attribute generator={made_by!r}; teacher "
            "training needs exact pairs from a store generated with generator.backend 'oracle' (procedural scenes)"
        )
    blob = json.dumps([[s, t, done[(s, t, "refine")], done[(s, t, "generate")]] for s, t in units])
    t, _, h, w = frames.shape
    return PairIndex(scenes, hashlib.sha256(blob.encode()).hexdigest()[:16], int(h), int(w), int(t))


@dataclass(frozen=True)
class PairView:
    """One trajectory as uint8/bool tensors: truth (T,3,H,W), warped (T,3,H,W), mask (T,1,H,W), first (3,H,W)."""

    truth: torch.Tensor
    warped: torch.Tensor
    mask: torch.Tensor
    first: torch.Tensor
    cameras: Cameras
    prompt: str


class PairCache:
    """Reads trajectories of a store as :class:`PairView` (LRU)."""

    def __init__(self, store: RunStore, size: int = 256) -> None:
        self.store, self.size = store, size
        self._cache: OrderedDict[tuple[str, str], PairView] = OrderedDict()
        self._prompts: dict[str, str] | None = None

    def get(self, scene_id: str, trajectory: str) -> PairView:
        key = (scene_id, trajectory)
        if key not in self._cache:
            base = f"trajectories/{trajectory}"
            arr = lambda name: torch.from_numpy(self.store.read_array(scene_id, name))  # noqa: E731
            truth = arr(f"{base}/teacher/rgb")
            attrs = self.store.scene_group(scene_id)[f"{base}/teacher/rgb"].attrs
            if attrs.get("generator") != "oracle":
                raise LyraInputError(f"{self.store.url}: scene {scene_id} trajectory {trajectory}: teacher/rgb was "
                                     f"made by {attrs.get('generator')!r}, not the oracle (no exact ground truth)")
            if self._prompts is None:
                self._prompts = {r["scene_id"]: r.get("text") or "" for r in self.store.read_prompts()}
            _, _, h, w = truth.shape
            cams = Cameras(arr(f"{base}/cameras/c2w").float(), arr(f"{base}/cameras/K").float(), int(h), int(w))
            self._cache[key] = PairView(truth, arr(f"{base}/warp/rgb"), arr(f"{base}/refine/mask").bool(),
                                        arr("input/rgb"), cams, self._prompts.get(scene_id, ""))
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]


def _signed(x: torch.Tensor) -> torch.Tensor:
    return to_signed(from_uint8(x))


def sample_pairs(gen: torch.Generator, pairs: PairCache, scenes: dict[str, list[str]], train: list[str],
                 cfg: TeacherTrainConfig, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of training crops drawn from ``gen``: clean frames (B,3,c,c) in [-1,1] and conditioning (B,7,c,c).

    Frames 1.. of random training trajectories; a ``hole_crops`` share is centred on a random disoccluded pixel
    (crops of the rest are uniform), so the model sees enough of what it must invent."""
    c = cfg.crop
    x0, cond = [], []
    for _ in range(cfg.batch if count is None else count):
        scene = train[int(torch.randint(len(train), (1,), generator=gen))]
        trajs = scenes[scene]
        view = pairs.get(scene, trajs[int(torch.randint(len(trajs), (1,), generator=gen))])
        t, _, h, w = view.truth.shape
        f = int(torch.randint(1, t, (1,), generator=gen)) if t > 1 else 0
        holes = (~view.mask[f, 0]).nonzero()
        if float(torch.rand(1, generator=gen)) < cfg.hole_crops and len(holes):
            y, x = holes[int(torch.randint(len(holes), (1,), generator=gen))].tolist()
            y0, x0_ = min(max(y - c // 2, 0), h - c), min(max(x - c // 2, 0), w - c)
        else:
            y0, x0_ = crop_boxes(1, h, w, c, gen)[0]
        sl = (slice(y0, y0 + c), slice(x0_, x0_ + c))
        x0.append(_signed(view.truth[f][:, sl[0], sl[1]]))
        warped, mask = view.warped[f : f + 1, :, sl[0], sl[1]], view.mask[f : f + 1, :, sl[0], sl[1]]
        cond.append(teacher_condition(_signed(warped), mask, from_uint8(view.first[:, sl[0], sl[1]]))[0])
    return torch.stack(x0), torch.stack(cond)


def sample_videos(gen: torch.Generator, pairs: PairCache, scenes: dict[str, list[str]], train: list[str],
                  n: int) -> list[PairView]:
    """``n`` random training trajectories (whole videos, for latent-space teachers)."""
    out = []
    for _ in range(n):
        scene = train[int(torch.randint(len(train), (1,), generator=gen))]
        trajs = scenes[scene]
        out.append(pairs.get(scene, trajs[int(torch.randint(len(trajs), (1,), generator=gen))]))
    return out


def view_inputs(view: PairView) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(truth in [-1,1], warped in [-1,1] with holes -1, mask, first frame in [0,1]) as float tensors."""
    warped = torch.where(view.mask, _signed(view.warped), torch.full(view.warped.shape, -1.0))
    return _signed(view.truth), warped, view.mask, from_uint8(view.first)


# ------------------------------------------------------------------------------------------------------------
# Runs and checkpoints
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherRun:
    name: str
    config: TeacherTrainConfig
    fingerprint: str
    train_scenes: list[str]
    val_scenes: list[str]
    preset: str

    def as_json(self) -> dict[str, Any]:
        return {"format_version": TEACHER_TRAIN_VERSION, "kind": "teacher", "name": self.name, "preset": self.preset,
                "config": self.config.model_dump(mode="json"), "dataset_fingerprint": self.fingerprint,
                "train_scenes": self.train_scenes, "val_scenes": self.val_scenes}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> TeacherRun:
        return cls(doc["name"], TeacherTrainConfig.model_validate(doc["config"]), doc["dataset_fingerprint"],
                   list(doc["train_scenes"]), list(doc["val_scenes"]), doc.get("preset", ""))


def plan_teacher_run(store: RunStore, config: TeacherTrainConfig, preset: str = "") -> TeacherRun:
    """The run for ``config`` on the store's current pairs, created (run.json) if new, else read back."""
    index = index_pairs(store)
    if config.model == "tiny" and config.crop > min(index.height, index.width):
        raise LyraConfigError(f"teacher crop {config.crop} exceeds the store's {index.height}x{index.width} frames")
    if config.model == "diffusers":
        from lyra_pipeline.backends.diffusers_video import check_frame_format, inspect_checkpoint

        d = config.diffusers
        info = inspect_checkpoint(d.model_path, d.conditioned_path)
        if info.family != "wan":
            raise LyraConfigError(f"{d.model_path}: teacher fine-tuning supports Wan (flow matching); "
                                  f"{info.pipeline_class} is not supported yet")
        check_frame_format(info, index.frames, index.height, index.width)
    name = "teacher-" + content_key("teacher", TEACHER_TRAIN_VERSION, run_params(config, {"streams": 1}),
                                    {"dataset": index.fingerprint})[:12]

    def create() -> dict[str, Any]:
        train, val = split_scenes(sorted(index.scenes), config.val_scenes, config.seed)
        return TeacherRun(name, config, index.fingerprint, train, val, preset).as_json()

    return TeacherRun.from_json(load_or_create_run(store, name, create))


def load_teacher_run(store: RunStore, name: str) -> TeacherRun:
    return TeacherRun.from_json(read_run_json(store, name))


class TeacherState(TrainState):
    """The runner's training state plus the diffusers wrapper (``extra``) for ``model: diffusers``."""

    @property
    def diffusers(self) -> Any:
        return self.extra

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: full_tensor(p) for n, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable(self, state: dict[str, torch.Tensor], source: str) -> None:
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if set(state) != set(params):
            odd = sorted(set(state) ^ set(params))[:4]
            raise LyraConfigError(f"{source}: weights {odd} do not match the trainable parameters of this config")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n].to(p.device, p.dtype))


def new_teacher_trainer(cfg: TeacherTrainConfig, device: str | None = None) -> TeacherState:
    device = device or cfg.device
    teacher = None
    if cfg.model == "diffusers":
        from lyra_pipeline.backends.diffusers_teacher import DiffusersTeacher

        d = cfg.diffusers
        teacher = DiffusersTeacher(d.model_path, conditioned_path=d.conditioned_path, lora_rank=d.lora_rank,
                                   device=device, sampling_steps=cfg.sampling_steps, guidance=d.guidance,
                                   seed=cfg.seed)
        model = teacher.module
    else:
        model = build_unet(cfg.unet.spec(), seed=cfg.seed).to(device).train()
    optimizer, scheduler = teacher_optimizer(cfg, model)
    return TeacherState(model, optimizer, scheduler, stream_generators(cfg.seed, "teacher-sampling", cfg.streams),
                        0, teacher)


def teacher_optimizer(cfg: TeacherTrainConfig, model: torch.nn.Module) -> tuple[torch.optim.AdamW, Any]:
    """AdamW over the trainable parameters, with the warm-up schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(cfg.warmup_steps))


def teacher_weights_bytes(state: TeacherState) -> bytes:
    config_key = "unet_config" if state.diffusers is None else "transformer_config"
    return st_save(state.trainable_state(), metadata={config_key: json.dumps(
        dict(state.model.config), sort_keys=True, default=list)})


# ------------------------------------------------------------------------------------------------------------
# The training loop (lyra_pipeline.runner runs it)
# ------------------------------------------------------------------------------------------------------------

TEACHER_METRICS = pa.schema([
    ("run", pa.string()), ("step", pa.int64()), ("loss", pa.float64()), ("grad_norm", pa.float64()),
    ("lr", pa.float64()), ("seconds", pa.float64()),
])  # fmt: skip


def tiny_inputs(gen: torch.Generator, pairs: PairCache, scenes: dict[str, list[str]], train: list[str],
                cfg: TeacherTrainConfig, count: int) -> tuple[torch.Tensor, ...]:
    """One stream's share of a step: ``count`` crops, their noise levels and noise, all drawn from ``gen``."""
    x0, cond = sample_pairs(gen, pairs, scenes, train, cfg, count)
    sigma = sample_sigmas(x0.shape[0], gen, shift=cfg.shift, logit_normal=cfg.logit_normal)
    return x0, cond, torch.randn(x0.shape, generator=gen), sigma


def tiny_loss(model: Any, x0: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
              cfg: TeacherTrainConfig, device: str, forward: Any = None) -> torch.Tensor:
    """Flow-matching loss of a crop batch (``forward``: the model's DDP wrapper in a distributed job)."""
    x0, cond, noise, sigma = (v.to(device) for v in (x0, cond, noise, sigma))
    out = network_output(model, flow_match_noisy(x0, noise, sigma), cond, sigma * 1000.0, forward=forward)
    if cfg.prediction == "velocity":
        return F.mse_loss(out.float(), flow_match_target(x0, noise))
    return F.mse_loss(out.float(), x0)  # = sigma^2-weighted velocity loss


class TeacherRecipe(Recipe):
    """Teacher fine-tuning for :mod:`lyra_pipeline.runner`. The global batch is ``cfg.batch`` crops (tiny) or
    videos (diffusers) split evenly over ``cfg.streams`` sampling streams: the unit a rank of a distributed job
    takes."""

    metric_schema = TEACHER_METRICS

    def __init__(self, store: RunStore, run: TeacherRun, ctx: DistContext | None = None,
                 parallel: str = "ddp") -> None:
        cfg = run.config
        self.store, self.run, self.run_name, self.total_steps = store, run, run.name, cfg.steps
        self.batch, self.grad_clip, self.torch_threads = cfg.streams, cfg.grad_clip, cfg.torch_threads
        self.parallel = parallel  # a job's choice, not the run's: "ddp" or "fsdp" (lyra_pipeline.runner)
        self.device = (ctx or DistContext()).device(cfg.device)
        self.pairs = PairCache(store)
        self.index: dict[str, list[str]] = {}

    def prepare(self) -> None:
        self.index = index_pairs(self.store).scenes
        missing = [s for s in self.run.train_scenes if s not in self.index]
        if missing:
            raise LyraStorageError(f"{self.store.url}: training scenes {missing[:5]} of run {self.run_name} no "
                                   "longer have finished teacher frames")

    def new_state(self) -> TeacherState:
        return new_teacher_trainer(self.run.config, self.device)

    def new_optimizer(self, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        return teacher_optimizer(self.run.config, model)

    def weights_bytes(self, state: TeacherState) -> bytes:
        return teacher_weights_bytes(state)

    def load_weights(self, state: TeacherState, data: bytes, source: str) -> None:
        state.load_trainable(st_load(data), source)

    def micro_batches(self, streams: list[int]) -> list[list[int]]:
        # The tiny teacher's crops go through one batched forward; diffusers videos one stream at a time.
        return [streams] if self.run.config.model == "tiny" else [[s] for s in streams]

    def loss(self, state: TeacherState, model, streams: list[int]) -> StepResult:
        cfg = self.run.config
        per = cfg.batch // cfg.streams
        if state.diffusers is None:  # each stream's crops and noise from its generator, one forward over all
            parts = [tiny_inputs(state.generators[s], self.pairs, self.index, self.run.train_scenes, cfg, per)
                     for s in streams]
            loss = tiny_loss(state.model, *(torch.cat(p) for p in zip(*parts, strict=True)), cfg, self.device,
                             forward=model)
        else:
            losses = []
            for s in streams:
                videos = sample_videos(state.generators[s], self.pairs, self.index, self.run.train_scenes, per)
                losses += [state.diffusers.loss(*view_inputs(v), v.prompt, state.generators[s], forward=model)
                           for v in videos]
            loss = sum(losses) / len(losses)
        return StepResult(loss, {"loss": float(loss.detach())})

    def keep_checkpoints(self, steps: list[int]) -> set[int]:
        return set(steps[-self.run.config.keep_checkpoints:])

    def log_step(self, step: int, row: dict[str, Any]) -> None:
        if step % 50 == 0 or step == self.total_steps:
            log.info("%s step %d/%d loss %.4f (%.3f s/step)", self.run_name, step, self.total_steps, row["loss"],
                     row["seconds"])

    def step_error(self, step: int, first: int, exc: Exception) -> Exception:
        return LyraNonFiniteError(f"teacher run {self.run_name}, step {step}: {exc}; nothing was saved after "
                                  f"checkpoint step {first} — lower lr")


def teacher_chunk_ends(cfg: TeacherTrainConfig) -> list[int]:
    return sorted(set(range(cfg.checkpoint_every, cfg.steps, cfg.checkpoint_every)) | {cfg.steps})


def teacher_recipe(store_url: str, run_name: str, ctx: DistContext | None = None) -> TeacherRecipe:
    store = RunStore(store_url, create=False)
    return TeacherRecipe(store, load_teacher_run(store, run_name), ctx)


def load_teacher_trainer(store: RunStore, run: TeacherRun, step: int) -> TeacherState:
    """The exact state of checkpoint ``step`` (weights, AdamW moments, LR schedule, sampling streams)."""
    return load_state(TeacherRecipe(store, run), step)


def train_teacher_until(store_url: str, run_name: str, until_step: int,
                        ctx: DistContext | None = None) -> dict[str, Any]:
    """Train teacher run ``run_name`` from its newest checkpoint up to ``until_step`` and checkpoint there (does
    nothing when a checkpoint at or beyond it exists)."""
    return runner.train_until(teacher_recipe(store_url, run_name, ctx), until_step, ctx)


def final_teacher_step(store: RunStore, run: TeacherRun) -> int:
    steps = checkpoint_steps(store, run.name)
    if not steps or steps[-1] < run.config.steps:
        raise LyraStorageError(f"{store.url}: teacher run {run.name} has not finished ({steps[-1] if steps else 0} "
                               f"of {run.config.steps} steps)")
    return steps[-1]


# ------------------------------------------------------------------------------------------------------------
# Evaluation on held-out scenes and export
# ------------------------------------------------------------------------------------------------------------

EVAL_SCHEMA = pa.schema([
    ("run", pa.string()), ("step", pa.int64()), ("model_sha256", pa.string()), ("scene_id", pa.string()),
    ("trajectory", pa.string()), ("method", pa.string()), ("frames", pa.int32()),
    ("psnr_disoccluded", pa.float64()), ("psnr_all", pa.float64()), ("ssim", pa.float64()),
    ("disoccluded_fraction", pa.float64()), ("sse_disoccluded", pa.float64()), ("n_disoccluded", pa.int64()),
    ("sse_all", pa.float64()), ("n_all", pa.int64()),
])  # fmt: skip
METHODS = ("teacher", "warp_only", "oracle")


def trained_model(store: RunStore, run: TeacherRun, step: int) -> tuple[TeacherState, str]:
    trainer = load_teacher_trainer(store, run, step)
    state = json.loads(store.read_file(RunStore.checkpoint_rel(run.name, step, "state.json")))
    trainer.model.eval()
    return trainer, state["sha256"]["model.safetensors"]


def teacher_video(trainer: TeacherState, view: PairView, cfg: TeacherTrainConfig, seed: int,
                  frame_batch: int = 8) -> torch.Tensor:
    """The teacher's video (T,3,H,W) in [0,1] for one stored trajectory (what its generator backend does)."""
    if trainer.diffusers is not None:
        _, warped, mask, first = view_inputs(view)
        return trainer.diffusers.video(first, view.prompt, view.cameras, warped, mask, seed)
    model = trainer.model
    t, _, h, w = view.truth.shape
    cond = teacher_condition(_signed(view.warped).float(), view.mask, from_uint8(view.first))
    noise = torch.randn((1, 3, h, w), generator=torch.Generator().manual_seed(seed))
    out = torch.empty(t, 3, h, w)
    out[0] = from_uint8(view.first)
    for a in range(1, t, frame_batch):
        b = min(a + frame_batch, t)
        x = sample_frames(model, cond[a:b].to(cfg.device), noise.expand(b - a, -1, -1, -1).to(cfg.device),
                          steps=cfg.sampling_steps, shift=cfg.shift, prediction=cfg.prediction)
        out[a:b] = from_signed(x.cpu())
    return out


def score_video(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor, frames: list[int]) -> dict[str, Any]:
    """Scores of frames ``frames`` (frame 0 excluded: it is the input) against the exact truth."""
    pred, truth, mask = pred[frames], truth[frames], mask[frames]
    holes = disoccluded(torch.cat([torch.ones_like(mask[:1]), mask]))[1:]
    sse_h, n_h = region_sse(pred, truth, holes)
    sse_a, n_a = region_sse(pred, truth, torch.ones_like(mask))
    return {"frames": len(frames), "psnr_disoccluded": psnr_from_sse(sse_h, n_h), "psnr_all": psnr_from_sse(sse_a, n_a),
            "ssim": float(structural_similarity_index_measure(pred, truth, data_range=1.0)),
            "disoccluded_fraction": float(holes.float().mean()),
            "sse_disoccluded": sse_h, "n_disoccluded": n_h, "sse_all": sse_a, "n_all": n_a}


def evaluate_teacher(store_url: str, run_name: str, step: int) -> dict[str, Any]:
    """Held-out scenes: the trained teacher, the warp-only baseline and the oracle against the exact frames
    (``train/<run>/eval.parquet``; a finished evaluation of the same checkpoint is read back, not redone)."""
    store = RunStore(store_url, create=False)
    run = load_teacher_run(store, run_name)
    cfg = run.config
    rel = RunStore.train_rel(run.name, "eval.parquet")
    trainer, sha = trained_model(store, run, step)
    existing = store.read_table(rel)
    if existing is None or set(existing.column("model_sha256").to_pylist()) != {sha}:
        pin_torch_threads(cfg.torch_threads)
        index, pairs, rows = index_pairs(store).scenes, PairCache(store, size=8), []
        for scene in run.val_scenes:
            for traj in index.get(scene, []):
                view = pairs.get(scene, traj)
                truth = from_uint8(view.truth)
                frames = list(range(1, truth.shape[0], cfg.eval_frame_stride))
                seed = derive_seed(cfg.seed, "teacher-eval", scene, traj)
                warped = torch.where(view.mask, _signed(view.warped), torch.full(view.warped.shape, -1.0))
                videos = {
                    "teacher": teacher_video(trainer, view, cfg, seed),
                    "warp_only": warp_only_video(from_uint8(view.first), warped, view.mask),
                    "oracle": truth,
                }
                for method, video in videos.items():
                    rows.append({"run": run.name, "step": step, "model_sha256": sha, "scene_id": scene,
                                 "trajectory": traj, "method": method, **score_video(video, truth, view.mask, frames)})
        existing = pa.Table.from_pylist(rows, schema=EVAL_SCHEMA)
        store.write_table(rel, existing)
    return summarize_teacher_eval(existing)


def summarize_teacher_eval(table: pa.Table) -> dict[str, Any]:
    """Pooled PSNR (all held-out disoccluded pixels / all pixels) and mean SSIM per method."""
    rows = table.to_pylist()
    out: dict[str, Any] = {"val_trajectories": len({(r["scene_id"], r["trajectory"]) for r in rows})}
    for method in METHODS:
        sel = [r for r in rows if r["method"] == method]
        if not sel:
            continue
        out[f"{method}_psnr_disoccluded"] = psnr_from_sse(sum(r["sse_disoccluded"] for r in sel),
                                                          sum(r["n_disoccluded"] for r in sel))
        out[f"{method}_psnr_all"] = psnr_from_sse(sum(r["sse_all"] for r in sel), sum(r["n_all"] for r in sel))
        out[f"{method}_ssim"] = float(np.mean([r["ssim"] for r in sel]))
    if rows:
        oracle = [r["disoccluded_fraction"] for r in rows if r["method"] == "oracle"]
        out["disoccluded_fraction"] = float(np.mean(oracle))
    return out


def export_teacher(store_url: str, run_name: str, step: int, metrics: dict[str, Any],
                   out: str | Path | None = None) -> str:
    """Write the finished teacher folder into the store (``train/<run>/model/``) and optionally to ``out`` (a
    local folder, e.g. the package's shipped weights); returns the store-relative folder."""
    store = RunStore(store_url, create=False)
    run = load_teacher_run(store, run_name)
    trainer, sha = trained_model(store, run, step)
    meta = {
        "sampling_steps": run.config.sampling_steps, "shift": run.config.shift, "prediction": run.config.prediction,
        "trained": {"run": run.name, "step": step, "preset": run.preset, "checkpoint_sha256": sha,
                    "dataset_fingerprint": run.fingerprint, "train_scenes": len(run.train_scenes),
                    "val_scenes": run.val_scenes, "config": run.config.model_dump(mode="json"),
                    "command": f"lyra train-teacher --store STORE --preset {run.preset or 'CUSTOM'}"},
        "held_out": {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()},
    }  # fmt: skip
    def write(folder: str | Path) -> Path:
        if trainer.diffusers is not None:
            return trainer.diffusers.save_folder(folder, meta)
        return write_teacher_folder(trainer.model, folder, meta)

    with tempfile.TemporaryDirectory() as tmp:
        folder = write(tmp)
        for name in sorted(p.name for p in folder.iterdir() if p.is_file()):  # large models write shards
            data = (folder / name).read_bytes()
            rel = RunStore.train_rel(run.name, "model", name)
            if store.read_file(rel) != data:
                store.write_file(rel, data)
        if out is not None:
            write(out)
    return RunStore.train_rel(run.name, "model")
