"""One training runner for every model we train (decoder distillation, teacher fine-tuning).

A :class:`Recipe` says what is trained: the model and optimizer, how one micro-batch's loss is made, how weights
are written and read, which metrics a step logs. The runner does the rest, once:

- **Checkpoints**: progress is made in chunks; each ends with ``train/<run>/checkpoints/step-N/`` holding
  ``model.safetensors`` (the recipe's weights), ``optimizer.safetensors`` (AdamW moments keyed
  ``<field>/<parameter>`` and every sampling stream's RNG state) and ``state.json`` written last (the commit
  marker, with the files' sha256 and the LR scheduler). A killed chunk resumes from the newest committed
  checkpoint to the same weights as an uninterrupted run; a finished one is a no-op. Metrics of a chunk go to
  ``metrics/step-N.parquet`` before its checkpoint commits.
- **Sampling streams**: a step's global batch is ``recipe.batch`` samples, sample ``i`` drawn from its own
  generator (stream ``i``, seeded from the run seed and ``i``; stream 0 is the single stream of one-sample runs).
- **Data parallelism** (torch.distributed DDP, under torchrun): rank ``r`` of ``W`` computes streams
  ``r, r+W, ...``, each micro-batch's loss scaled by its share of the global batch times ``W`` so that DDP's
  mean over ranks is the global batch mean. The weights after a step therefore do not depend on the world size
  (up to the order of float sums), and a checkpoint, which holds every stream, resumes at any world size. Rank 0
  alone writes checkpoints and metrics; the others wait at a barrier and read them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lyra_ops.distill import apply_gradients
from lyra_ops.errors import LyraConfigError, LyraStorageError
from lyra_ops.seeding import derive_seed
from lyra_pipeline.distributed import DistContext, report_progress
from lyra_pipeline.storage import RunStore
from lyra_pipeline.threads import exact_cpu, pin_torch_threads

log = logging.getLogger(__name__)
RNG_PREFIX = "rng/sampler"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_params(config: Any, added_defaults: dict[str, Any]) -> dict[str, Any]:
    """A config as it names a run: fields added after runs were published (``added_defaults``: name -> the value
    runs had before) join only when set otherwise, so existing runs keep their names and resume."""
    params = config.model_dump(mode="json")
    for name, default in added_defaults.items():
        if params.get(name) == default:
            params.pop(name)
    return params


def stream_generators(seed: int, label: str, count: int) -> list[torch.Generator]:
    """One sampling generator per sample of the global batch (stream 0 keeps the one-stream seed)."""
    seeds = [derive_seed(seed, label) if i == 0 else derive_seed(seed, label, "stream", i) for i in range(count)]
    return [torch.Generator().manual_seed(s) for s in seeds]


def check_world_size(nproc: int, nnodes: int, streams: int, field: str = "train.batch") -> int:
    """The job's world size, checked before anything is launched: every rank needs a sampling stream."""
    if nproc < 1 or nnodes < 1:
        raise LyraConfigError(f"--nproc {nproc} / --nnodes {nnodes}: expected positive integers")
    world = nproc * nnodes
    if world > streams:
        raise LyraConfigError(f"{world} processes but {field} = {streams}: every rank needs at least one sample per "
                              f"step; set {field} to a multiple of {world} (e.g. --batch {world})")
    return world


def rank_streams(batch: int, ctx: DistContext) -> list[int]:
    """The global-batch samples rank ``ctx.rank`` computes."""
    check_world_size(ctx.world, 1, batch)
    return list(range(ctx.rank, batch, ctx.world))


@dataclass
class TrainState:
    """Mutable training state: model, optimizer, LR scheduler, one generator per sampling stream, steps done."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generators: list[torch.Generator]
    step: int = 0
    extra: Any = None  # what a recipe keeps beside the module (e.g. the diffusers teacher wrapper)

    @property
    def generator(self) -> torch.Generator:
        return self.generators[0]

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


@dataclass
class StepResult:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Recipe(ABC):
    """What a training run trains. Subclasses set the attributes in ``__init__`` and implement the methods."""

    store: RunStore
    run_name: str
    total_steps: int
    batch: int = 1  # samples per step (global batch), one sampling stream each
    grad_clip: float = 1.0
    device: str = "cpu"
    torch_threads: int | None = None
    metric_schema: pa.Schema
    # How a job holds the model (a launch option, not part of the run): "ddp" replicates it on every rank; "fsdp"
    # (PyTorch FSDP2) shards parameters, gradients and AdamW moments over the ranks, for models one GPU cannot
    # hold with their optimizer state. Both average the same gradients.
    parallel: str = "ddp"

    @abstractmethod
    def new_state(self) -> TrainState: ...

    def new_optimizer(self, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        """(optimizer, LR scheduler) over ``model``'s trainable parameters; needed for ``parallel: fsdp``, which
        builds them again over the sharded parameters."""
        raise NotImplementedError(f"{type(self).__name__} does not support parallel 'fsdp'")

    def shard(self, model: torch.nn.Module) -> None:
        """FSDP2: shard ``model`` in place (each block its own unit, then the root)."""
        from torch.distributed.fsdp import fully_shard

        for name in ("blocks", "down_blocks", "up_blocks"):
            for block in getattr(model, name, None) or []:
                fully_shard(block)
        fully_shard(model)

    @abstractmethod
    def weights_bytes(self, state: TrainState) -> bytes:
        """The model file of a checkpoint (safetensors with the recipe's metadata)."""

    @abstractmethod
    def load_weights(self, state: TrainState, data: bytes, source: str) -> None: ...

    @abstractmethod
    def loss(self, state: TrainState, model: Any, streams: list[int]) -> StepResult:
        """Mean loss over the samples of ``streams`` at step ``state.step`` (each drawn from
        ``state.generators[stream]``); ``model`` is the module to call forward on (DDP-wrapped in a job)."""

    def micro_batches(self, streams: list[int]) -> list[list[int]]:
        """How a rank's samples are grouped into forward/backward passes (default: one sample each)."""
        return [[s] for s in streams]

    def prepare(self) -> None:
        """Checks before training (e.g. the run's scenes still exist): raise one clear error."""
        return None

    def checkpoint_info(self, step: int) -> dict[str, Any]:
        """Extra fields of a checkpoint's ``state.json``."""
        return {}

    def keep_checkpoints(self, steps: list[int]) -> set[int]:
        return set(steps[-2:])

    def row(self, step: int, metrics: dict[str, float], seconds: float) -> dict[str, Any]:
        return {"run": self.run_name, "step": step, **metrics, "seconds": seconds}

    def log_step(self, step: int, row: dict[str, Any]) -> None:
        if step % 10 == 0:
            log.info("%s step %d/%d loss %.4f (%.2f s/step)", self.run_name, step, self.total_steps,
                     row.get("total", row.get("loss", math.nan)), row["seconds"])

    def step_error(self, step: int, first: int, exc: Exception) -> Exception:
        return type(exc)(f"run {self.run_name}, step {step}: {exc}; nothing was saved after checkpoint step "
                         f"{first} — lower the learning rate or check the dataset")


# ------------------------------------------------------------------------------------------------------------
# Checkpoint files
# ------------------------------------------------------------------------------------------------------------


def checkpoint_steps(store: RunStore, run: str) -> list[int]:
    """Steps of the committed checkpoints of a run (those with a ``state.json``), ascending."""
    steps = []
    for name in store.list_names(RunStore.train_rel(run, "checkpoints")):
        if name.startswith("step-") and name[5:].isdigit():
            if store.read_file(RunStore.checkpoint_rel(run, int(name[5:]), "state.json")) is not None:
                steps.append(int(name[5:]))
    return sorted(steps)


def read_checked(store: RunStore, run: str, step: int, name: str, expected_sha: str) -> bytes:
    rel = RunStore.checkpoint_rel(run, step, name)
    data = store.read_file(rel)
    if data is None or sha256_hex(data) != expected_sha:
        what = "is missing" if data is None else "does not match the sha256 recorded in state.json (corrupt)"
        raise LyraStorageError(
            f"{store.url}/{rel} {what}; delete {RunStore.checkpoint_rel(run, step)} to resume from the previous "
            "checkpoint"
        )
    return data


def remove_uncommitted(store: RunStore, run: str, after: int) -> None:
    """Delete checkpoint folders newer than ``after`` without a state.json (a kill mid-save)."""
    committed = set(checkpoint_steps(store, run))
    for name in store.list_names(RunStore.train_rel(run, "checkpoints")):
        if name.startswith("step-") and name[5:].isdigit():
            step = int(name[5:])
            if step > after and step not in committed:
                store.remove_tree(RunStore.checkpoint_rel(run, step))


def full_tensor(t: Any) -> torch.Tensor:
    """A plain CPU tensor of ``t``; a sharded (FSDP DTensor) one is gathered first, which every rank must call."""
    t = torch.as_tensor(t) if not hasattr(t, "full_tensor") else t.full_tensor()
    return t.detach().cpu().contiguous()


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      generators: list[torch.Generator]) -> dict[str, torch.Tensor]:
    """Optimizer moments keyed ``<field>/<parameter name>`` plus every stream's RNG state (``rng/sampler`` for
    stream 0, ``rng/sampler/<i>`` for the others). Sharded moments are gathered (a collective under FSDP)."""
    out: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in optimizer.state.items():
        for k, v in st.items():
            out[f"{k}/{names[id(p)]}"] = full_tensor(v)
    for i, g in enumerate(generators):
        out[RNG_PREFIX if i == 0 else f"{RNG_PREFIX}/{i}"] = g.get_state()
    return out


def restore_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                      generators: list[torch.Generator], tensors: dict[str, torch.Tensor],
                      scheduler_state: dict[str, Any], *, source: str, device: str = "cpu") -> None:
    """Inverse of :func:`optimizer_tensors` (+ the LR scheduler's state): the exact optimizer state to resume."""
    params = dict(model.named_parameters())
    for key, value in sorted(tensors.items()):  # one order on every rank (FSDP scatters each moment)
        if key.startswith(RNG_PREFIX):
            continue
        name, pname = key.split("/", 1)
        if pname not in params:
            raise LyraStorageError(f"{source}: optimizer state names unknown parameter {pname!r}")
        param = params[pname]
        value = value.to(device)
        if hasattr(param, "device_mesh") and value.shape == param.shape:  # FSDP: this rank's shard of the moment
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value, param.device_mesh, param.placements)
        optimizer.state[param][name] = value
    scheduler.load_state_dict(scheduler_state)
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    for i, g in enumerate(generators):
        key = RNG_PREFIX if i == 0 else f"{RNG_PREFIX}/{i}"
        if key not in tensors:
            raise LyraStorageError(f"{source}: no RNG state for sampling stream {i} (the checkpoint was written with "
                                   "a smaller batch)")
        g.set_state(tensors[key])


def checkpoint_files(recipe: Recipe, state: TrainState) -> tuple[bytes, bytes]:
    """(model, optimizer) safetensors bytes of ``state`` (under FSDP a collective: every rank calls it)."""
    return recipe.weights_bytes(state), st_save(optimizer_tensors(state.model, state.optimizer, state.generators))


def save_checkpoint(recipe: Recipe, state: TrainState, files: tuple[bytes, bytes] | None = None) -> str:
    """Write ``step-N/{model,optimizer}.safetensors`` then ``state.json`` (the commit marker, with hashes).
    Returns the model file's sha256."""
    store, run = recipe.store, recipe.run_name
    model_bytes, opt_bytes = files or checkpoint_files(recipe, state)
    store.write_file(RunStore.checkpoint_rel(run, state.step, "model.safetensors"), model_bytes)
    store.write_file(RunStore.checkpoint_rel(run, state.step, "optimizer.safetensors"), opt_bytes)
    doc = {
        "step": state.step, "run": run, **recipe.checkpoint_info(state.step),
        "scheduler": state.scheduler.state_dict(),
        "sha256": {"model.safetensors": sha256_hex(model_bytes), "optimizer.safetensors": sha256_hex(opt_bytes)},
        "saved_at": time.time(),
    }  # fmt: skip
    store.write_file(RunStore.checkpoint_rel(run, state.step, "state.json"), json.dumps(doc).encode())
    return doc["sha256"]["model.safetensors"]


def checkpoint_sha(store: RunStore, run: str, step: int) -> str:
    doc = json.loads(store.read_file(RunStore.checkpoint_rel(run, step, "state.json")))
    return doc["sha256"]["model.safetensors"]


def load_state(recipe: Recipe, step: int) -> TrainState:
    """The exact training state of checkpoint ``step`` (weights, AdamW moments, scheduler, sampling streams)."""
    store, run = recipe.store, recipe.run_name
    doc = json.loads(store.read_file(RunStore.checkpoint_rel(run, step, "state.json")))
    state = recipe.new_state()
    source = f"{store.url}: checkpoint step {step}"
    recipe.load_weights(state, read_checked(store, run, step, "model.safetensors", doc["sha256"]["model.safetensors"]),
                        source)
    opt = read_checked(store, run, step, "optimizer.safetensors", doc["sha256"]["optimizer.safetensors"])
    restore_optimizer(state.model, state.optimizer, state.scheduler, state.generators, st_load(opt), doc["scheduler"],
                      source=source, device=recipe.device)
    state.step = int(doc["step"])
    return state


def prune_checkpoints(recipe: Recipe) -> None:
    steps = checkpoint_steps(recipe.store, recipe.run_name)
    keep = recipe.keep_checkpoints(steps)
    for step in steps:
        if step not in keep:
            recipe.store.remove_tree(RunStore.checkpoint_rel(recipe.run_name, step))


# ------------------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------------------


def shard_state(recipe: Recipe, state: TrainState) -> None:
    """FSDP: shard the model in place, then rebuild the optimizer and scheduler over the sharded parameters,
    carrying over the optimizer moments (each rank keeps its shard) and the schedule."""
    moments = optimizer_tensors(state.model, state.optimizer, state.generators)
    schedule = state.scheduler.state_dict()
    recipe.shard(state.model)
    state.optimizer, state.scheduler = recipe.new_optimizer(state.model)
    restore_optimizer(state.model, state.optimizer, state.scheduler, state.generators, moments, schedule,
                      source=f"run {recipe.run_name} (sharding)", device=recipe.device)


def train_step(recipe: Recipe, state: TrainState, net: Any, streams: list[int], ctx: DistContext) -> dict[str, float]:
    """One optimiser step on the global batch: this rank's micro-batches (gradients accumulated, all-reduced by DDP
    on the last), metrics averaged over the whole batch, then the update (identical on every rank)."""
    state.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    groups = recipe.micro_batches(streams)
    sums: dict[str, float] = {}
    for i, group in enumerate(groups):
        with ctx.no_sync(net, sync=i == len(groups) - 1):
            out = recipe.loss(state, net, group)
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"non-finite loss ({float(out.loss)})")
            share = len(group) * ctx.world / recipe.batch
            (out.loss * share if share != 1 else out.loss).backward()
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + v * len(group)
    keys = sorted(sums)
    totals = ctx.sum([sums[k] for k in keys])
    metrics = {k: v / recipe.batch for k, v in zip(keys, totals, strict=True)}
    norm, lr = apply_gradients(state.trainable(), state.optimizer, state.scheduler, recipe.grad_clip,
                               f"run {recipe.run_name}")
    return {**metrics, "grad_norm": norm, "lr": lr}


def train_until(recipe: Recipe, until_step: int, ctx: DistContext | None = None,
                on_checkpoint: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train ``recipe``'s run from its newest checkpoint up to ``until_step`` steps and checkpoint there (a no-op
    when a checkpoint at or beyond it exists). In a job every rank calls this; rank 0 writes."""
    ctx = ctx or DistContext()
    store, run = recipe.store, recipe.run_name
    until_step = min(until_step, recipe.total_steps)
    steps = checkpoint_steps(store, run)
    if steps and steps[-1] >= until_step:
        return {"run": run, "from": steps[-1], "to": steps[-1], "computed": 0}
    start = max([s for s in steps if s <= until_step], default=0)
    streams = rank_streams(recipe.batch, ctx)
    if ctx.main:
        remove_uncommitted(store, run, start)
    pin_torch_threads(recipe.torch_threads)
    recipe.prepare()
    state = load_state(recipe, start) if start else recipe.new_state()
    sharded = ctx.distributed and recipe.parallel == "fsdp"
    if sharded:
        shard_state(recipe, state)
    net = state.model if sharded else ctx.wrap(state.model, recipe.device)
    rows: list[dict[str, Any]] = []
    first = state.step
    with exact_cpu(recipe.torch_threads, recipe.device):  # on CPU: the same weights however threads are scheduled
        while state.step < until_step:
            t0 = time.perf_counter()
            try:
                metrics = train_step(recipe, state, net, streams, ctx)
            except FloatingPointError as exc:
                raise recipe.step_error(state.step + 1, first, exc) from exc
            state.step += 1
            rows.append(recipe.row(state.step, metrics, time.perf_counter() - t0))
            recipe.log_step(state.step, rows[-1])
    ctx.share_streams(state.generators, streams)  # rank 0 checkpoints the streams the others advanced
    sha = None
    files = checkpoint_files(recipe, state) if sharded else None  # gathering the shards takes every rank
    if ctx.main:
        store.write_table(RunStore.train_rel(run, "metrics", f"step-{state.step:08d}.parquet"),
                          pa.Table.from_pylist(rows, schema=recipe.metric_schema))
        sha = save_checkpoint(recipe, state, files)
        prune_checkpoints(recipe)
    ctx.barrier()  # every rank leaves with the checkpoint committed
    if sha is None:
        sha = checkpoint_sha(store, run, state.step)
    if on_checkpoint is not None:
        on_checkpoint(state.step)
    loss_key = "total" if "total" in rows[0] else "loss"
    return {"run": run, "from": first, "to": state.step, "computed": state.step - first,
            "loss_first": rows[0][loss_key], "loss_last": rows[-1][loss_key], "model_sha256": sha}


def train_chunks(recipe: Recipe, ends: list[int], ctx: DistContext | None = None) -> list[dict[str, Any]]:
    """Every chunk in turn (a worker of a distributed job trains them all in one process); rank 0 reports
    progress lines after each."""
    ctx = ctx or DistContext()
    out = []
    for end in ends:
        out.append(train_until(recipe, end, ctx))
        if ctx.main:
            report_progress(out[-1]["to"], recipe.total_steps)
    return out
