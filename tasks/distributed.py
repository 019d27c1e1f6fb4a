"""The Prefect task that runs a distributed training job: torchrun over ``lyra_pipeline.train_worker``.

One task for the whole job (every checkpoint interval): its ranks' log lines stream into the task's log, rank 0's
progress lines move the flow's progress artifact, a failed job fails the task with the failing rank's error, and
a retry relaunches torchrun, which resumes from the newest checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import update_progress_artifact

from lyra_pipeline.distributed import (
    DistributedJobError,
    collateral,
    killed_rank,
    parse_progress,
    run_torchrun,
    torchrun_command,
)
from lyra_pipeline.retries import transient_only
from lyra_pipeline.runner import checkpoint_steps
from lyra_pipeline.storage import RunStore

# The attempts of a job Prefect is retrying (retries run in this process), by (store, run): the step the first one
# started from, and the ranks killed in earlier ones as [what was killed, the step the next attempt resumed from
# (None until it starts)].
_JOBS: dict[tuple[str, str], dict[str, Any]] = {}


def _attempt() -> int:
    """Which attempt of its task run this is (1 outside Prefect, e.g. ``.fn``)."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    return ctx.task_run.run_count if ctx is not None else 1


# A rank killed by a signal (preemption, OOM killer, lost node) is retried from the last checkpoint; a rank that
# raised fails the same way again (lyra_pipeline.retries.is_transient).
@task(name="train-distributed", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=transient_only)
def train_distributed(store_url: str, kind: str, run_name: str, *, nproc: int, nnodes: int = 1,
                      rdzv_endpoint: str | None = None, total_steps: int, progress_id: UUID | None = None,
                      parallel: str = "ddp", python: str | None = None) -> dict[str, Any]:
    """Run ``torchrun -m lyra_pipeline.train_worker kind STORE RUN`` with ``nproc`` processes per node on
    ``nnodes`` nodes (``parallel``: ddp, or fsdp for the teacher); returns the steps before the first attempt and
    after the last, and ``interrupted``: one line per attempt a killed rank ended (``rank 1 was killed (SIGKILL);
    resumed from step 10``)."""
    logger = get_run_logger()
    store = RunStore(store_url, create=False)
    key = (store_url, run_name)
    before = (checkpoint_steps(store, run_name) or [0])[-1]
    if _attempt() <= 1 or key not in _JOBS:
        _JOBS[key] = {"from": before, "killed": []}  # a new job: nothing of an earlier one's attempts
    for entry in _JOBS[key]["killed"]:
        if entry[1] is None:
            entry[1] = before
            logger.info("%s; resuming from step %d", entry[0], before)

    def done(after: int) -> dict[str, Any]:
        job = _JOBS.pop(key, {"from": before, "killed": []})
        return {"run": run_name, "from": job["from"], "to": after, "computed": after - job["from"],
                "world_size": nproc * nnodes,
                "interrupted": [f"{what}; resumed from step {step}" for what, step in job["killed"]]}

    if before >= total_steps:  # finished: no job to launch
        return done(before)
    cmd = torchrun_command(["lyra_pipeline.train_worker", kind, store_url, run_name, "--parallel", parallel],
                           nproc=nproc, nnodes=nnodes,
                           rdzv_endpoint=rdzv_endpoint, run_id=run_name, **({"python": python} if python else {}))
    logger.info("launching %s", " ".join(cmd))

    def on_line(line: str) -> None:
        progress = parse_progress(line)
        if progress is None:
            if line.strip() and "find_unused_parameters=True was specified" not in line:
                # a rank's own error warns; one that lost its peer (killed: the retry says so) is only logged
                own = "LYRA_RANK_ERROR" in line and not collateral(line)
                logger.log(logging.WARNING if own else logging.INFO, "%s", line)
        elif progress_id is not None:
            update_progress_artifact(progress_id, progress=100.0 * progress["step"] / max(total_steps, 1))

    try:
        run_torchrun(cmd, on_line=on_line)
    except DistributedJobError as exc:
        what = killed_rank(str(exc)) if exc.retriable else None
        if what is not None:  # Prefect retries it; the attempt that resumes notes its starting step
            _JOBS[key]["killed"].append([what, None])
        raise
    return done((checkpoint_steps(store, run_name) or [0])[-1])
