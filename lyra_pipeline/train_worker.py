"""The process torchrun starts for a distributed training job (one per rank).

    torchrun --nproc-per-node 2 -m lyra_pipeline.train_worker decoder|teacher STORE RUN [--until STEP]
        [--parallel ddp|fsdp]

``decoder`` trains a planned decoder run (``lyra_pipeline.training``), ``teacher`` a teacher run
(``lyra_pipeline.teacher_training``): every checkpoint interval up to ``--until`` (default: the end), resuming
from the newest checkpoint. Rank 0 writes checkpoints and metrics and prints ``LYRA_PROGRESS`` lines; a failing
rank prints one ``LYRA_RANK_ERROR`` line (see :mod:`lyra_pipeline.distributed`) and exits non-zero, which ends
the job. ``lyra train --nproc N`` and the Prefect flows run this through torchrun for you.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lyra_pipeline.distributed import context, env_context, report_rank_error


def run_job(kind: str, store_url: str, run_name: str, until: int | None = None, parallel: str = "ddp") -> list[dict]:
    """Train ``run_name`` up to ``until`` steps in this process, as one rank of the torchrun job it is in."""
    from lyra_pipeline.runner import train_chunks
    from lyra_pipeline.storage import RunStore

    store = RunStore(store_url, create=False)
    if kind == "decoder":
        from lyra_pipeline.training import DecoderRecipe, chunk_ends, load_run

        run = load_run(store, run_name)
        ends, device = chunk_ends(run.config), run.config.device
        if parallel != "ddp":
            raise ValueError("--parallel fsdp is for the teacher (the decoder fits on one GPU: use ddp)")
        make = lambda ctx: DecoderRecipe(store, run, ctx)  # noqa: E731
    else:
        from lyra_pipeline.teacher_training import TeacherRecipe, load_teacher_run, teacher_chunk_ends

        run = load_teacher_run(store, run_name)
        ends, device = teacher_chunk_ends(run.config), run.config.device
        make = lambda ctx: TeacherRecipe(store, run, ctx, parallel=parallel)  # noqa: E731
    if until is not None:
        ends = [e for e in ends if e < until] + [until]
    with context(device) as ctx:
        return train_chunks(make(ctx), ends, ctx)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lyra_pipeline.train_worker", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["decoder", "teacher"])
    parser.add_argument("store")
    parser.add_argument("run")
    parser.add_argument("--until", type=int, default=None, help="stop at this step count (default: the run's end)")
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                        help="replicate the model on every rank (ddp) or shard it (fsdp, teacher only)")
    args = parser.parse_args(argv)
    ctx = env_context()
    logging.basicConfig(level=logging.INFO if ctx.main else logging.WARNING, stream=sys.stdout,
                        format=f"[rank {ctx.rank}] %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        run_job(args.kind, args.store, args.run, args.until, args.parallel)
    except BaseException as exc:  # noqa: BLE001 - every failure ends as one line torchrun's caller can read
        report_rank_error(exc)
        logging.getLogger(__name__).debug("rank %d failed", ctx.rank, exc_info=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
