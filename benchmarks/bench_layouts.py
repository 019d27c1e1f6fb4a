"""Benchmark: what a Gaussian layout could do on pixels the input never saw (issue 27, item 3).

For held-out procedural scenes, each layout's exact-data ceiling (``lyra_ops.decoder.ceiling_gaussians``: exact
depth and teacher colours on that layout's rays, fused as the decoder fuses) is scored like the decoder-quality
table (``lyra_pipeline.quality``: path frames, held-out cameras, the input camera; all / seen / unseen pixels).
Then the held-out cameras' unseen pixels (the input frame did not see their surface) are split by whether *any*
teacher frame saw it (exact depths within the same 2%): no layout placed on the teacher frames' surfaces has
anything to put on the others, which is what limits a gain there. The decoder (shipped, as users get it) is
scored on both parts beside the ceiling.

    python benchmarks/bench_layouts.py --store /tmp/h6          # lyra run --preset default --seed 777 --num-scenes 6

Writes ``benchmarks/results/layout_ceilings.json`` and prints a table; never asserts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lyra_ops.baselines import seen_mask  # noqa: E402
from lyra_ops.decoder import ceiling_gaussians  # noqa: E402
from lyra_ops.images import from_uint8  # noqa: E402
from lyra_ops.metrics import psnr  # noqa: E402
from lyra_pipeline import quality as Q  # noqa: E402
from lyra_pipeline.shipped import shipped_decoder, shipped_decoder_info  # noqa: E402
from lyra_pipeline.storage import RunStore  # noqa: E402
from lyra_pipeline.training import ViewCache, index_dataset, procedural_world  # noqa: E402

LAYOUTS: dict[str, dict[str, Any]] = {
    "shipped: one per 4x4 block of one frame per latent frame": {},
    "every frame (gaussian_frames: all)": {"gaussian_frames": "all"},
    "one per 2x2 block (gaussian_stride: 2)": {"gaussian_stride": 2},
    "one per 2x2 block of every frame": {"gaussian_stride": 2, "gaussian_frames": "all"},
}
PARTS = ("teacher_saw", "nobody_saw")


def teacher_coverage(inputs: Q.SceneInputs, targets: Q.Targets, tol: float) -> torch.Tensor:
    """(N,1,H,W) bool: target pixels whose surface some frame of some trajectory saw (exact depths within tol)."""
    depth = torch.cat([d[:, 0] for d in inputs.exact_depth])
    ks = torch.cat([v.cameras.K for v in inputs.views])
    c2ws = torch.cat([v.cameras.c2w for v in inputs.views])
    return torch.stack([seen_mask(targets.depth[i, 0], targets.cameras.K[i], targets.cameras.c2w[i], depth, ks, c2ws,
                                  tol) for i in range(len(targets.cameras))])[:, None]


def mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(vals) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--scenes", default=None, help="comma-separated scene ids (default: every scene of the store)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/layout_ceilings.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = RunStore(args.store, create=False)
    index = index_dataset(store).scenes
    scenes = args.scenes.split(",") if args.scenes else sorted(index)
    model, _ = shipped_decoder()
    settings = Q.QualitySettings()
    views = ViewCache(store, size=8)
    rows: list[dict[str, Any]] = []
    parts: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for sid in scenes:
        t1 = time.perf_counter()
        inputs = Q.load_scene_inputs(store, sid, index[sid], views, procedural_world(store, sid))
        targets = [Q.path_targets(inputs, settings.path_stride, settings.seen_tol),
                   Q.held_out_targets(inputs, settings), Q.input_targets(inputs, settings.seen_tol)]
        planes = {t.split: Q.plane_depth(t.depth, inputs.input_depth) for t in targets}
        bg = Q.scene_background(inputs, settings)
        known = [v.known_depth for v in inputs.views]
        built = {}
        for name, over in LAYOUTS.items():
            config = dataclasses.replace(model.config, **over)

            def make(config=config, inputs=inputs, known=known):
                return ceiling_gaussians(config, [v.cameras for v in inputs.views],
                                         [from_uint8(v.frames) for v in inputs.views], inputs.exact_depth,
                                         known_depth_per_view=known)

            result = Q.gaussian_method(make, targets, settings, bg)
            built[name] = result
            for t in targets:
                rows += [{**r, "method": name} for r in Q.score_rows(sid, "ceiling", t, result, planes[t.split])]
        held = targets[1]
        covered = teacher_coverage(inputs, held, settings.seen_tol)
        masks = {"teacher_saw": ~held.seen & covered, "nobody_saw": ~held.seen & ~covered}
        decoder = Q.gaussian_method(lambda sid=sid: Q.scene_gaussians(model, views, sid, index[sid]), [held],
                                    settings, bg)
        scene_parts: dict[str, Any] = {"fraction": {k: float(m.float().mean()) for k, m in masks.items()}}
        first = next(iter(LAYOUTS))
        for label, result in (("ceiling", built[first]), ("decoder", decoder)):
            rgb = result.renders[Q.HELD_OUT].rgb
            scene_parts[label] = {k: float(psnr(rgb, held.gt, m).nanmean()) for k, m in masks.items()}
        parts[sid] = scene_parts
        print(f"  {sid}: {time.perf_counter() - t1:.0f} s; held-out unseen pixels a teacher frame saw "
              f"{scene_parts['fraction']['teacher_saw']:.1%}, none saw {scene_parts['fraction']['nobody_saw']:.1%}")
    table: dict[str, Any] = {}
    for split in Q.SPLITS:
        for name in LAYOUTS:
            cell = {}
            for key in ("psnr", "psnr_seen", "psnr_unseen", "depth_absrel", "gaussians"):
                cell[key] = mean([mean([r[key] for r in rows if r["split"] == split and r["method"] == name
                                        and r["scene_id"] == sid]) for sid in scenes])
            table.setdefault(split, {})[name] = cell
    unseen = {
        "fraction": {k: mean([p["fraction"][k] for p in parts.values()]) for k in PARTS},
        **{label: {k: mean([p[label][k] for p in parts.values()]) for k in PARTS} for label in ("ceiling", "decoder")},
    }
    result = {"store": store.url, "scenes": scenes, "decoder_render": shipped_decoder_info().get("render"),
              "layouts": {name: over for name, over in LAYOUTS.items()}, "ceilings": table,
              "held_out_unseen": unseen, "held_out_unseen_per_scene": parts,
              "seconds": time.perf_counter() - t0, "threads": args.threads}
    print("\nlayout ceiling (exact data), mean over scenes, dB: path all / unseen | held-out all / seen / unseen | "
          "input | Gaussians")
    for name in LAYOUTS:
        p, h, i = table["path"][name], table["held_out"][name], table["input"][name]
        print(f"  {name:<58} {p['psnr']:.2f} / {p['psnr_unseen']:.2f} | {h['psnr']:.2f} / {h['psnr_seen']:.2f} / "
              f"{h['psnr_unseen']:.2f} | {i['psnr']:.2f} | {p['gaussians']:.0f}")
    print(f"\nheld-out unseen pixels: {unseen['fraction']['teacher_saw']:.1%} of the view a teacher frame saw "
          f"(ceiling {unseen['ceiling']['teacher_saw']:.2f} dB, decoder {unseen['decoder']['teacher_saw']:.2f} dB), "
          f"{unseen['fraction']['nobody_saw']:.1%} none saw (ceiling {unseen['ceiling']['nobody_saw']:.2f} dB, "
          f"decoder {unseen['decoder']['nobody_saw']:.2f} dB)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
