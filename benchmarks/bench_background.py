"""Benchmark: does a decoder's export look the same over any viewer background?

For each decoder (the shipped one, and any ``--checkpoint``), on held-out scenes of a store: the scene's
Gaussians as ``export-ply`` writes them (all trajectories as input, the export's default smoothing), rendered at
every ``--stride``-th frame of every path over the decoder's own background (the input's mean colour), over
white and over PlayCanvas's grey (0.5), each scored by PSNR against the teacher frames (which have no
background: every pixel shows the scene) and, for procedural scenes, against the exact render. Also the mean
rendered alpha (1 = nothing of the background shows). A background-independent decoder scores the same over
all three. With ``--backdrop``, each decoder is also scored as ``export-ply`` writes it by default, with the
opaque sphere of its training background behind the scene. Writes ``benchmarks/results/background.json``; never asserts.

    python benchmarks/bench_background.py --store /work/data/d12 --scenes proc-000003,proc-000007 \\
        --checkpoint /work/data/d12/train/decoder-.../checkpoints/step-00000300/model.safetensors
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lyra_ops.distill import (  # noqa: E402
    INFERENCE,
    background_color,  # noqa: E402
    build_batch,
    render_batch,
)
from lyra_ops.images import from_uint8, to_uint8  # noqa: E402
from lyra_ops.latents import PixelPatchifyEncoder  # noqa: E402
from lyra_ops.metrics import psnr  # noqa: E402
from lyra_pipeline.reconstruct import EXPORT_SMOOTHING, with_backdrop  # noqa: E402
from lyra_pipeline.shipped import shipped_decoder  # noqa: E402
from lyra_pipeline.storage import RunStore  # noqa: E402
from lyra_pipeline.training import (  # noqa: E402
    ViewCache,
    load_decoder_bytes,
    procedural_world,
    scene_gaussians,
    scene_trajectories,
)

REPO = Path(__file__).resolve().parents[1]
BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "grey": (0.5, 0.5, 0.5)}


def scene_rows(model, store: RunStore, scene: str, stride: int, backdrop: bool = False) -> dict[str, float]:
    views = ViewCache(store, size=8)
    trajs = scene_trajectories(store, scene)
    g = scene_gaussians(model, views, scene, trajs)
    first = views.get(scene, trajs[0])
    centre = first.cameras.c2w[0, :3, 3]
    g = g.smoothed(centre, float(first.cameras.K[0, 0, 0]), EXPORT_SMOOTHING)
    if backdrop:  # as export-ply writes it by default (--backdrop auto)
        g = with_backdrop(g, centre, background_color(first.frames[0], model.config.background))
    world = procedural_world(store, scene)
    scores: dict[str, list[float]] = {}
    for traj in trajs:
        view = views.get(scene, traj)
        frames = list(range(0, int(view.frames.shape[0]), stride))
        batch = build_batch([view], list(range(int(view.frames.shape[0]))), frames, INFERENCE, PixelPatchifyEncoder(),
                            model.config.background)
        gt = None
        if world is not None:
            cams = view.cameras
            gt = from_uint8(to_uint8(world.render(cams.c2w[frames], cams.K[frames], cams.height, cams.width).rgb))
        own = batch.background
        for name, colour in {"decoder": own, **{k: torch.tensor(v) for k, v in BACKGROUNDS.items()}}.items():
            with torch.no_grad():
                out = render_batch(g, replace(batch, background=colour))
            rgb = out.rgb.clamp(0, 1)
            scores.setdefault(f"psnr_teacher_{name}", []).extend(psnr(rgb, batch.rgb).tolist())
            if gt is not None:
                scores.setdefault(f"psnr_gt_{name}", []).extend(psnr(rgb, gt).tolist())
            if name == "decoder":
                scores.setdefault("alpha_mean", []).extend(out.alpha.mean(dim=(1, 2, 3)).tolist())
    return {k: statistics.mean(v) for k, v in scores.items()} | {"gaussians": g.num}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--scenes", required=True, help="comma-separated held-out scene ids")
    ap.add_argument("--checkpoint", action="append", default=[], help="decoder .safetensors (repeatable)")
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "background.json"))
    ap.add_argument("--backdrop", action="store_true", help="also score each decoder's export with the backdrop "
                    "export-ply adds by default (rows '<name> + backdrop')")
    ap.add_argument("--merge", action="store_true", help="keep the other rows already in --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = RunStore(args.store, create=False)
    decoders = {"shipped": shipped_decoder()[0]}
    for path in args.checkpoint:
        decoders[Path(path).parent.parent.parent.name + "/" + Path(path).parent.name] = load_decoder_bytes(
            Path(path).read_bytes(), path)
    doc: dict = {"store": args.store, "scenes": args.scenes.split(","), "stride": args.stride, "decoders": {}}
    if args.merge and Path(args.out).is_file():  # keep rows measured earlier (e.g. fine-tunes not at hand now)
        old = json.loads(Path(args.out).read_text())
        if old.get("scenes") != doc["scenes"] or old.get("stride") != args.stride:
            raise SystemExit(f"{args.out}: --merge needs the same --scenes and --stride as the rows there")
        doc["decoders"] = old["decoders"]
    for name, model in decoders.items():
        for backdrop in (False, True) if args.backdrop else (False,):
            rows = {s: scene_rows(model.eval(), store, s, args.stride, backdrop) for s in args.scenes.split(",")}
            mean = {k: statistics.mean(r[k] for r in rows.values()) for k in next(iter(rows.values()))}
            key = name + (" + backdrop" if backdrop else "")
            doc["decoders"][key] = {"mean": mean, "scenes": rows}
            print(key, json.dumps({k: round(v, 3) for k, v in mean.items()}), flush=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
