"""Data parallelism for the training runner: the process group as torchrun sets it up, and launching torchrun.

Inside a worker, :func:`context` reads the standard torchrun environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and joins the process group (gloo on CPU, NCCL on CUDA, each rank
on ``cuda:<LOCAL_RANK>``). Without that environment it is the one-process context, so the same training code
runs alone, under ``torchrun`` on one machine, or on several.

Outside, :func:`torchrun_command` builds the ``torchrun`` command of a job and :func:`run_torchrun` runs it as a
subprocess, streaming its lines to a callback and turning a failed job into one :class:`DistributedJobError`
that names the failing rank and its error (our workers print a ``LYRA_RANK_ERROR`` line; for a rank killed by a
signal, torchrun's own root-cause report is read). Ranks gather each other's node and host when the job starts, so
a rank whose peer machine died (a broken connection, not an error of its own) names the node it lost.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from lyra_ops.errors import LyraConfigError, LyraError

RANK_ERROR = "LYRA_RANK_ERROR"  # a worker's last line when it fails: LYRA_RANK_ERROR {"rank": r, "error": "..."}
PROGRESS = "LYRA_PROGRESS"  # rank 0 after each checkpoint: LYRA_PROGRESS {"step": s, "total": n}


class DistributedJobError(LyraError):
    """A torchrun job failed; the message names the rank that failed first and its error. ``retriable``: no rank
    reported an error of its own (one was killed: preemption, out of memory, a lost node), so a relaunch that
    resumes from the last checkpoint may succeed."""

    def __init__(self, message: str, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank, world size, local rank (its GPU on the node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def device(self, configured: str) -> str:
        """The configured device for this rank: ``cuda`` becomes ``cuda:<local rank>`` in a job."""
        return f"cuda:{self.local_rank}" if self.distributed and configured == "cuda" else configured

    def wrap(self, model: Any, device: str) -> Any:
        """``model`` under DistributedDataParallel in a job (gradients averaged over ranks at backward), else
        itself. ``find_unused_parameters``: stages leave some heads unused (no depth input, no prune)."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [int(device.split(":")[1])] if device.startswith("cuda:") else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def no_sync(self, wrapped: Any, sync: bool):
        """Context for one micro-batch's backward: gradient all-reduce (DDP) or reduce-scatter (FSDP) only on
        the last one of a step."""
        if not self.distributed:
            return nullcontext()
        if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2 module
            wrapped.set_requires_gradient_sync(sync)
            return nullcontext()
        return wrapped.no_sync() if not sync else nullcontext()

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if not self.distributed:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.cpu().tolist()


    def share_streams(self, generators: list[Any], mine: Sequence[int]) -> None:
        """Give every rank the RNG state of every sampling stream from the rank that advanced it (before rank 0
        checkpoints them all)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        states: list[Any] = [None] * self.world
        dist.all_gather_object(states, {i: generators[i].get_state() for i in mine})
        for part in states:
            for i, state in part.items():
                generators[i].set_state(state)


def env_context() -> DistContext:
    """The context torchrun's environment describes (no process group is joined)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistContext(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def context(device: str) -> Iterator[DistContext]:
    """Join torchrun's process group for the duration (a no-op outside torchrun)."""
    ctx = env_context()
    if not ctx.distributed:
        yield ctx
        return
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        if torch.cuda.device_count() <= ctx.local_rank:
            raise LyraConfigError(f"rank {ctx.rank}: device 'cuda' but this node has {torch.cuda.device_count()} "
                                  f"CUDA GPU(s) for local rank {ctx.local_rank}")
        torch.cuda.set_device(ctx.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    try:
        _PEERS[:] = _gather_peers(ctx)
        yield ctx
    finally:
        dist.destroy_process_group()


# Every rank's place (node, host, rank) as gathered when the job started: a rank that loses a peer names its node.
_PEERS: list[dict[str, Any]] = []


def _gather_peers(ctx: DistContext) -> list[dict[str, Any]]:
    import socket

    import torch.distributed as dist

    mine = {"rank": ctx.rank, "node": int(os.environ.get("GROUP_RANK", "0")), "host": socket.gethostname()}
    peers: list[Any] = [None] * ctx.world
    dist.all_gather_object(peers, mine)
    return peers


def lost_peer(error: str, peers: Sequence[dict[str, Any]], rank: int) -> str:
    """``error`` (a broken connection to a peer, :func:`collateral`) with the node that went away named: the other
    node of a two-node job, or the nodes it may be (more nodes: gloo names an address, not a rank). The error is
    shortened to gloo's own sentence (``Connection closed by peer [10.0.0.2]:4242``)."""
    me = next((p for p in peers if p["rank"] == rank), None)
    short = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", error).split(". ", 1)[0].strip()
    if me is None:
        return short
    nodes: dict[int, dict[str, Any]] = {}
    for p in peers:
        if p["node"] != me["node"]:
            nodes.setdefault(p["node"], {"host": p["host"], "ranks": []})["ranks"].append(p["rank"])
    if not nodes:  # a peer on this node: name its rank(s)
        others = sorted(p["rank"] for p in peers if p["rank"] != rank)
        return f"lost rank {', '.join(map(str, others))} on this node: {short}" if len(others) == 1 else short

    def describe(node: int) -> str:
        info = nodes[node]
        ranks = ", ".join(map(str, sorted(info["ranks"])))
        return f"node {node} (host {info['host']}, rank{'s' if len(info['ranks']) > 1 else ''} {ranks})"

    if len(nodes) == 1:
        return f"lost {describe(next(iter(nodes)))}: {short}"
    return f"lost one of {', '.join(describe(n) for n in sorted(nodes))}: {short}"


# ------------------------------------------------------------------------------------------------------------
# Launching
# ------------------------------------------------------------------------------------------------------------


def torchrun_command(target: Sequence[str], *, nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None,
                     run_id: str = "lyra", python: str = sys.executable, module: bool = True) -> list[str]:
    """``torchrun`` (as ``python -m torch.distributed.run``) for ``python -m <target...>`` (``module=False``: a
    script path and its arguments).

    One node: a standalone rendezvous on a free local port. Several: the c10d rendezvous at ``rdzv_endpoint``
    (``host:port``), the same command run on every node."""
    if nproc < 1 or nnodes < 1:
        raise LyraConfigError(f"--nproc {nproc} / --nnodes {nnodes}: expected positive integers")
    cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--max-restarts=0"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        if not rdzv_endpoint or not re.fullmatch(r"[A-Za-z0-9_.\-\[\]:]+:\d+", rdzv_endpoint):
            raise LyraConfigError(f"--rdzv-endpoint {rdzv_endpoint!r}: expected HOST:PORT of the rendezvous node "
                                  "(the same on every node)")
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={run_id}"]
    return [*cmd, *(["-m"] if module else []), *target]


_COLLATERAL = re.compile(r"Connection (reset|closed|refused)|Broken pipe|remote (worker|process)|"
                         r"collective operation timeout|NCCL communicator was aborted|Socket Timeout", re.I)
_ROOT_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
_ROOT_FIELD = re.compile(r"^\s*(exitcode|traceback)\s*:\s*(.*)$")


def failure_from_output(lines: Sequence[str]) -> str | None:
    """The rank that failed first and its error. torchrun's "Root Cause" report names the rank; its message is
    that rank's ``LYRA_RANK_ERROR`` line when it wrote one (an exception), else torchrun's account (a signal).
    Without the report (torchrun itself cut short), the first ``LYRA_RANK_ERROR`` line."""
    errors: dict[str, str] = {}
    for line in lines:
        if RANK_ERROR in line:
            try:
                doc = json.loads(line.split(RANK_ERROR, 1)[1])
                errors.setdefault(str(doc["rank"]), str(doc["error"]))
            except (ValueError, KeyError):
                continue
    rank, fields, in_root = None, {}, False
    for line in lines:
        if "Root Cause" in line:
            in_root = True
        elif in_root:
            if (m := _ROOT_RANK.match(line)) and rank is None:
                rank = m.group(1)
            elif (m := _ROOT_FIELD.match(line)) and m.group(1) not in fields:
                fields[m.group(1)] = m.group(2).strip()
    if rank is None:
        first = next(iter(errors.items()), None)
        return f"rank {first[0]} failed: {first[1]}" if first else None
    if rank in errors:
        # A rank whose peer died first fails on the broken connection, and may be observed first: prefer a rank's
        # own error over such a symptom.
        own = [(r, e) for r, e in errors.items() if not _COLLATERAL.search(e)]
        r, e = own[0] if _COLLATERAL.search(errors[rank]) and own else (rank, errors[rank])
        return f"rank {r} failed: {e}"
    traceback = fields.get("traceback", "")
    what = traceback if traceback and "To enable traceback" not in traceback else \
        f"exit code {fields.get('exitcode', '?')}"
    return f"rank {rank} failed: {what}"


def run_torchrun(cmd: Sequence[str], *, on_line: Callable[[str], None] = lambda line: None,
                 env: dict[str, str] | None = None) -> list[str]:
    """Run a torchrun command, each output line (stdout and stderr merged) to ``on_line``; returns the lines.
    Raises :class:`DistributedJobError` naming the failing rank when the job fails."""
    lines: list[str] = []
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip("\n")
        lines.append(line)
        on_line(line)
    code = proc.wait()
    if code != 0:
        lost = lost_rendezvous(lines, cmd)
        reason = failure_from_output(lines) or lost or f"torchrun exited with code {code}: {' | '.join(lines[-5:])}"
        raise DistributedJobError(f"distributed training failed: {reason}", retriable=killed(reason) or reason == lost)
    return lines


_RENDEZVOUS_LOST = re.compile(r"RendezvousConnectionError|connection to the C10d store has failed", re.I)


def lost_rendezvous(lines: Sequence[str], cmd: Sequence[str]) -> str | None:
    """One line for a node whose torchrun agent lost the c10d rendezvous store (the node serving it at
    ``--rdzv-endpoint`` went away, so this node's agent fails before any rank reports): naming that endpoint; None
    when the output shows no such failure. A relaunch of every node resumes from the last checkpoint."""
    if not any(_RENDEZVOUS_LOST.search(line) for line in lines):
        return None
    endpoint = next((a.split("=", 1)[1] for a in cmd if a.startswith("--rdzv-endpoint=")), None)
    where = f"the node serving the rendezvous at {endpoint}" if endpoint else "the rendezvous host"
    return f"lost {where} (torchrun's c10d store); relaunch every node to resume from the last checkpoint"


def killed(reason: str) -> bool:
    """True when the failing rank was ended by a signal (preemption, the OOM killer, a lost node), not by an error
    it raised: a relaunch that resumes from the last checkpoint may then succeed."""
    return bool(re.search(r"Signal \d+|SIG[A-Z]+|exit code -\d+", reason))


def collateral(error: str) -> bool:
    """True for the error a rank gets when a peer died under it (a broken connection): a symptom, not a cause."""
    return bool(_COLLATERAL.search(error))


def killed_rank(reason: str) -> str | None:
    """One line for a job that failed because a rank was ended by a signal (:func:`killed`): ``rank 1 was killed
    (SIGKILL)``; None for any other failure."""
    if not killed(reason):
        return None
    rank = re.search(r"rank (\d+) failed", reason)
    name = re.search(r"\b(SIG[A-Z]+)\b", reason)
    label = name.group(1) if name else None
    if label is None and (num := re.search(r"Signal (\d+)|exit code -(\d+)", reason)):
        number = int(num.group(1) or num.group(2))
        try:
            label = signal.Signals(number).name
        except ValueError:
            label = f"signal {number}"
    return f"{f'rank {rank.group(1)}' if rank else 'a rank'} was killed ({label or 'a signal'})"


def report_rank_error(exc: BaseException) -> None:
    """A worker's last words: one machine-readable line with its rank and error (read by :func:`run_torchrun`)."""
    ctx = env_context()
    error = str(exc) or type(exc).__name__
    if _PEERS and collateral(error):  # a peer (a node) went away under this rank: say which
        error = lost_peer(error, _PEERS, ctx.rank)
    print(f"{RANK_ERROR} {json.dumps({'rank': ctx.rank, 'error': error})}", file=sys.stderr, flush=True)


def report_progress(step: int, total: int) -> None:
    print(f"{PROGRESS} {json.dumps({'step': step, 'total': total})}", flush=True)


def parse_progress(line: str) -> dict[str, int] | None:
    if PROGRESS not in line:
        return None
    try:
        return json.loads(line.split(PROGRESS, 1)[1])
    except ValueError:
        return None
