"""Package a training run's checkpoint as the shipped decoder (``lyra_pipeline/weights/decoder``).

Copies ``model.safetensors`` byte for byte and writes ``decoder.json`` beside it: the run's training config,
the dataset fingerprint and split, the step shipped (of the run's total), the summed wall time of the training
steps (``cpu_seconds``, with the torch threads used; for a run started from weights (``init_weights``) the
description of those weights is kept under ``init`` when they are the decoder shipped now, and ``steps`` /
``cpu_seconds`` sum over both runs), and the held-out quality table of
``benchmarks/bench_distill.py`` (``--quality``: its JSON, measured on that same checkpoint).

    python benchmarks/ship_decoder.py --store /work/data/d40 --run decoder-b9565f132664 \\
        --quality benchmarks/results/decoder_quality.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lyra_pipeline.shipped import INFO_FILE, MODEL_FILE, SHIPPED_DECODER  # noqa: E402
from lyra_pipeline.storage import RunStore  # noqa: E402
from lyra_pipeline.training import checkpoint_steps, load_run, read_metrics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    ap.add_argument("--quality", required=True, help="bench_distill JSON measured on this checkpoint")
    ap.add_argument("--dest", default=str(SHIPPED_DECODER))
    args = ap.parse_args()
    store = RunStore(args.store, create=False)
    run = load_run(store, args.run)
    step = args.step or checkpoint_steps(store, run.name)[-1]
    data = store.read_file(RunStore.checkpoint_rel(run.name, step, "model.safetensors"))
    sha = hashlib.sha256(data).hexdigest()
    quality = json.loads(Path(args.quality).read_text())
    if quality.get("model_sha256") not in (None, sha):
        raise SystemExit(f"{args.quality} was measured on checkpoint {quality['model_sha256'][:12]}, not {sha[:12]}")
    metrics = [r for r in read_metrics(store, run.name).to_pylist() if r["step"] <= step]
    dest = Path(args.dest)
    seconds = round(sum(r["seconds"] for r in metrics), 1)
    info = {
        "format": 1, "run": run.name, "step": step, "steps": step, "total_steps": run.config.total_steps,
        "model_sha256": sha, "config": run.config.model_dump(mode="json"), "data_fingerprint": run.fingerprint,
        "data": {"frames": run.frames, "height": run.height, "width": run.width, "teacher": "oracle",
                 "scenes": "procedural"},
        "train_scenes": run.train_scenes, "val_scenes": run.val_scenes,
        "cpu_seconds": seconds, "cpu_threads": run.config.torch_threads, "held_out": quality,
    }  # fmt: skip
    if run.init_sha256:  # the run started from weights: record where they came from, totals over the lineage
        previous = dest / INFO_FILE
        before = json.loads(previous.read_text()) if previous.is_file() else {}
        if before.get("model_sha256") == run.init_sha256:
            before.pop("held_out", None)
            info["init"] = before
            info["steps"] = step + int(before.get("steps", 0))
            info["cpu_seconds"] = round(seconds + float(before.get("cpu_seconds", 0.0)), 1)
            info["run_steps"], info["run_cpu_seconds"] = step, seconds
        else:
            info["init"] = {"model_sha256": run.init_sha256}
    previous = dest / INFO_FILE
    if previous.is_file() and "render" in (before := json.loads(previous.read_text())):
        info["render"] = before["render"]  # the rendering-only settings it is decoded with stay (edit to change)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MODEL_FILE).write_bytes(data)
    (dest / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    print(f"shipped {run.name} step {step} ({len(data) / 2**20:.1f} MiB) to {dest}")


if __name__ == "__main__":
    main()
