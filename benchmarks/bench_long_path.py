"""Benchmark: a long camera path generated clip by clip vs a one-clip path, seconds per frame.

The Lyra-2 example path (``../shared/data/lyra_examples/custom_trajectory_examples``, 500 frames, held to 505 =
8k+1) on one procedural smoke scene (96x160) with the shipped tiny teacher: ``trajectories.frames: all`` (clips
of 9 frames sharing ``generator.clip_overlap`` frames, cross-faded, each conditioned on the cache of the input
frame and the earlier clip's frame where it starts) against ``clip`` (its first 9 frames, one clip). Times every
SDG stage in-process, one after the other in this one run, and reports seconds per path frame for the
generation stage and for the whole SDG, plus the clip-boundary smoothness measures of
``tests/test_custom_paths.py`` on the long path. Writes
``benchmarks/results/long_path_cpu.json``; never asserts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lyra_pipeline.config import build_config  # noqa: E402
from lyra_pipeline.storage import RunStore  # noqa: E402
from tasks.sdg import SCENE_TASKS, sample_prompts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO.parent / "shared" / "data" / "lyra_examples" / "custom_trajectory_examples" / "example_0"


def run(path: Path, frames: str, work: Path, threads: int) -> dict:
    config = build_config("smoke", {"scenes": {"num_scenes": 1}, "generator": {"backend": "tiny"},
                                    "trajectories": {"custom": str(path), "frames": frames},
                                    "compute": {"torch_threads": threads}})
    store = work / f"store-{frames}"
    shutil.rmtree(store, ignore_errors=True)
    (scene,) = sample_prompts.fn(str(store), config)
    seconds = {}
    for name, task in SCENE_TASKS.items():
        t0 = time.perf_counter()
        task.fn(str(store), config, scene, "bench")
        seconds[name] = time.perf_counter() - t0
    st = RunStore(store, create=False)
    arr = st.scene_group(scene.scene_id)["trajectories/custom/teacher/rgb"]
    n = arr.shape[0]
    out = {"frames": frames, "path_frames": n, "clips": len(arr.attrs.get("clip_starts", [0])),
           "generate_s_per_frame": seconds["generate"] / n, "sdg_s_per_frame": sum(seconds.values()) / n,
           "stage_seconds": seconds}
    starts = arr.attrs.get("clip_starts")
    if starts and len(starts) > 1:
        video = torch.from_numpy(arr[:]).float()
        steps = (video[1:] - video[:-1]).abs().mean(dim=(1, 2, 3))
        first_new = [s for s in starts[1:]]  # frame s -> s + 1: the first frame each later clip generates
        inside = [i for i in range(n - 1) if i not in first_new]
        out["boundary_change_mean"] = float(steps[first_new].mean())
        out["boundary_change_max"] = float(steps[first_new].max())
        out["inside_change_mean"] = float(steps[inside].mean())
        out["inside_change_max"] = float(steps[inside].max())
        # every step of a cross-fade (from the frame a clip starts at to the first frame only it generates)
        # against the steps no fade touches
        ends = [a + arr.attrs["clip_frames"] for a in starts[:-1]]
        fade = sorted({i for s, e in zip(starts[1:], ends, strict=True) for i in range(s, e)})
        rest = [i for i in range(n - 1) if i not in fade]
        out["fade_change_mean"] = float(steps[fade].mean())
        out["outside_fade_change_mean"] = float(steps[rest].mean())
        out["clip_overlap"] = int(arr.attrs["clip_frames"] - (starts[1] - starts[0]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default=None, help="a custom trajectory (default: the Lyra-2 example's .npz)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "long_path_cpu.json"))
    args = ap.parse_args()
    path = Path(args.path) if args.path else next(EXAMPLE.glob("*.npz"))
    work = Path(tempfile.mkdtemp(prefix="bench-long-"))
    run(path, "clip", work, args.threads)  # warm-up: loads the teacher once, as a long-running worker has it
    rows = [run(path, "clip", work, args.threads), run(path, "all", work, args.threads)]
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k != "stage_seconds"}), flush=True)
    doc = {"path": str(path.relative_to(REPO.parent)) if path.is_relative_to(REPO.parent) else str(path),
           "preset": "smoke (96x160, 9-frame clips), shipped tiny teacher", "threads": args.threads, "runs": rows,
           "generate_ratio_long_vs_clip": rows[1]["generate_s_per_frame"] / rows[0]["generate_s_per_frame"],
           "sdg_ratio_long_vs_clip": rows[1]["sdg_s_per_frame"] / rows[0]["sdg_s_per_frame"]}
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(json.dumps({k: v for k, v in doc.items() if k != "runs"}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
