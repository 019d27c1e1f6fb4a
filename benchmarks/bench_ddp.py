"""Benchmark: data-parallel decoder training, 1 rank vs 2 ranks under torchrun (gloo, one torch thread each).

Builds a smoke store (in-process, every SDG stage) unless ``--store`` is given, plans one run per world size with
the same global batch (``--batch``, default 2: one sample per rank at two ranks) and trains each with
``torchrun --nproc-per-node N -m lyra_pipeline.train_worker``, one after the other in this one run. Reports per
world size: the job's wall time (process start, rendezvous and checkpoints included), the median optimiser step
time from the run's metrics (``seconds``, rank 0), steps and samples per second, and the 2-rank / 1-rank ratio;
checks that both runs ended with the same weights. Writes ``benchmarks/results/ddp_cpu.json``; never asserts.

    python benchmarks/bench_ddp.py                       # smoke store, tiny decoder, 30 steps
    python benchmarks/bench_ddp.py --store /work/data/d40 --preset default --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import load as st_load  # noqa: E402

from lyra_pipeline.distributed import run_torchrun, torchrun_command  # noqa: E402
from lyra_pipeline.storage import RunStore  # noqa: E402
from lyra_pipeline.training import build_train_config, plan_run, read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def smoke_store(path: Path, scenes: int) -> str:
    from lyra_pipeline.config import build_config
    from tasks.sdg import SCENE_TASKS, sample_prompts

    config = build_config("smoke", {"scenes": {"num_scenes": scenes}})
    for scene in sample_prompts.fn(str(path), config):
        for task in SCENE_TASKS.values():
            task.fn(str(path), config, scene, "bench")
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="a finished store (default: a new 4-scene smoke store)")
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ddp_cpu.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    base = args.store or smoke_store(work / "template", 4)
    over = {"stages": [{"name": "views_1", "steps": args.steps, "targets": 2}], "checkpoint_every": args.steps,
            "batch": args.batch, "torch_threads": 1, "val_scenes": 1}
    config = build_train_config(args.preset, over)
    results, finals = [], {}
    for world in (1, 2):
        url = str(shutil.copytree(base, work / f"world{world}", ignore=shutil.ignore_patterns("train")))
        run = plan_run(RunStore(url, create=False), config)
        t0 = time.perf_counter()
        run_torchrun(torchrun_command(["lyra_pipeline.train_worker", "decoder", url, run.name], nproc=world),
                     env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
        wall = time.perf_counter() - t0
        steps = read_metrics(RunStore(url, create=False), run.name).column("seconds").to_pylist()
        median = statistics.median(steps[1:] or steps)  # the first step warms up
        rel = RunStore.checkpoint_rel(run.name, args.steps, "model.safetensors")
        finals[world] = st_load(RunStore(url, create=False).read_file(rel))
        results.append({"world_size": world, "batch": args.batch, "steps": len(steps), "job_wall_s": wall,
                        "step_s_median": median, "steps_per_s": 1 / median, "samples_per_s": args.batch / median,
                        "job_steps_per_s": len(steps) / wall})
        print(json.dumps(results[-1]), flush=True)
    diff = max(float((finals[1][k] - finals[2][k]).abs().max()) for k in finals[1])
    doc = {"machine": f"{os.cpu_count()} cores, torch {torch.__version__}, gloo, 1 torch thread per rank",
           "preset": args.preset, "store": args.store or "smoke (4 scenes, 96x160, 9 frames)", "runs": results,
           "speedup_2_vs_1": results[0]["step_s_median"] / results[1]["step_s_median"],
           "job_speedup_2_vs_1": results[0]["job_wall_s"] / results[1]["job_wall_s"],
           "max_abs_weight_difference_1_vs_2_ranks": diff}
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(json.dumps({k: v for k, v in doc.items() if k != "runs"}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
