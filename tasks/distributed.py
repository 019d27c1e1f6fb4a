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

from lyra_pipeline.distributed import parse_progress, run_torchrun, torchrun_command
from lyra_pipeline.retries import transient_only
from lyra_pipeline.runner import checkpoint_steps
from lyra_pipeline.storage import RunStore


# A rank killed by a signal (preemption, OOM killer, lost node) is retried from the last checkpoint; a rank that
# raised fails the same way again (lyra_pipeline.retries.is_transient).
@task(name="train-distributed", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=transient_only)
def train_distributed(store_url: str, kind: str, run_name: str, *, nproc: int, nnodes: int = 1,
                      rdzv_endpoint: str | None = None, total_steps: int, progress_id: UUID | None = None,
                      parallel: str = "ddp", python: str | None = None) -> dict[str, Any]:
    """Run ``torchrun -m lyra_pipeline.train_worker kind STORE RUN`` with ``nproc`` processes per node on
    ``nnodes`` nodes (``parallel``: ddp, or fsdp for the teacher); returns the steps before and after."""
    logger = get_run_logger()
    store = RunStore(store_url, create=False)
    before = (checkpoint_steps(store, run_name) or [0])[-1]
    if before >= total_steps:  # finished: no job to launch
        return {"run": run_name, "from": before, "to": before, "computed": 0, "world_size": nproc * nnodes}
    cmd = torchrun_command(["lyra_pipeline.train_worker", kind, store_url, run_name, "--parallel", parallel],
                           nproc=nproc, nnodes=nnodes,
                           rdzv_endpoint=rdzv_endpoint, run_id=run_name, **({"python": python} if python else {}))
    logger.info("launching %s", " ".join(cmd))

    def on_line(line: str) -> None:
        progress = parse_progress(line)
        if progress is None:
            if line.strip() and "find_unused_parameters=True was specified" not in line:
                logger.log(logging.WARNING if "LYRA_RANK_ERROR" in line else logging.INFO, "%s", line)
        elif progress_id is not None:
            update_progress_artifact(progress_id, progress=100.0 * progress["step"] / max(total_steps, 1))

    run_torchrun(cmd, on_line=on_line)
    after = (checkpoint_steps(store, run_name) or [0])[-1]
    return {"run": run_name, "from": before, "to": after, "computed": after - before, "world_size": nproc * nnodes}
