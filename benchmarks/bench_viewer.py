"""Benchmark: what an export costs at the data's size and what PlayCanvas's HTML viewer shows at 4x (issue 27.2).

Held-out scenes (a store never trained on) are decoded with the shipped decoder. Each export variant (``raw``: as
decoded; ``smooth0.2``: today's default, :meth:`lyra_ops.gaussians.Gaussians.smoothed` by 0.2 px^2 of the input
camera; ``floor*``: :func:`lyra_ops.export_filter.floor_scales`; ``split*``:
:func:`lyra_ops.export_filter.split_subpixel`) gets the default export's backdrop and is

1. rendered by our rasterizer (:func:`lyra_pipeline.quality.render_gaussians`, 0.3 px^2 dilation) at the data's
   size at the input camera and ``--novel`` held-out cameras (as ``quality.held_out_targets`` draws them) and
   scored (PSNR) against the exact render of the procedural world (quantised to 8 bits, as quality does), and
2. with ``--shots``, written as the PlayCanvas HTML viewer (splat-transform ``-E`` settings opening at each camera
   over the decoder's background colour) and screenshotted in headless Chromium (software WebGL) at 4x the data's
   size (1280 x 704 for the default preset), scored against the exact render at that size (K scaled by 4);
   beside it our rasterizer's render of the raw Gaussians and of the input's exact RGB-D
   (:func:`lyra_ops.baselines.rgbd_gaussians`) at the same size.

Screenshots land in ``<out without .json>/`` as PNG (the first scene's ``--keep-shots`` cameras: a ``--crop`` of
each, the viewer's whole frame of the ``--full`` variants at the input camera). Never asserts.

    python benchmarks/bench_viewer.py --store /tmp/h6 --scenes proc-000000,proc-000001 --shots
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lyra_ops.baselines import rgbd_gaussians  # noqa: E402
from lyra_ops.cameras import Cameras  # noqa: E402
from lyra_ops.distill import background_color  # noqa: E402
from lyra_ops.export_filter import floor_scales, split_subpixel  # noqa: E402
from lyra_ops.gaussians import Gaussians  # noqa: E402
from lyra_ops.images import from_uint8, to_uint8  # noqa: E402
from lyra_ops.metrics import psnr  # noqa: E402
from lyra_pipeline.quality import QualitySettings, SceneInputs, held_out_targets, render_gaussians  # noqa: E402
from lyra_pipeline.reconstruct import (  # noqa: E402
    decode_scene,
    splat_transform,
    viewer_screenshot,
    viewer_settings,
    with_backdrop,
)
from lyra_pipeline.shipped import shipped_decoder  # noqa: E402
from lyra_pipeline.storage import RunStore  # noqa: E402
from lyra_pipeline.training import procedural_world  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCALE = 4  # the viewer's window: 4x the data's size


def variant(name: str, g: Gaussians, c2w: torch.Tensor, K: torch.Tensor, h: int, w: int) -> Gaussians:
    """The export variant ``name`` of the decoded Gaussians (before the backdrop)."""
    if name == "raw":
        return g
    if name.startswith("smooth"):
        return g.smoothed(c2w[:3, 3], float(K[0, 0]), float(name[len("smooth"):]))
    if name.startswith("floor"):
        return floor_scales(g, c2w, K, float(name[len("floor"):]))
    if name.startswith("split"):  # split[-bilinear][-same][-aADD][-oOFF]
        opts = {"opacity": "split", "colors": "same", "add_px2": 0.0225, "offset_px": 0.25}
        for part in name.split("-")[1:]:
            if part == "bilinear":
                opts["colors"] = "bilinear"
            elif part == "sameop":
                opts["opacity"] = "same"
            elif part.startswith("a"):
                opts["add_px2"] = float(part[1:])
            elif part.startswith("o"):
                opts["offset_px"] = float(part[1:])
        return split_subpixel(g, c2w, K, h, w, **opts)
    raise SystemExit(f"unknown variant {name!r}")


def scene_cameras(store: RunStore, scene: str, views, trajectories: list[str], novel: int):
    """The input camera and ``novel`` held-out cameras of the scene (quality's draw), the world and the input."""
    world = procedural_world(store, scene)
    data = [views.get(scene, t) for t in trajectories]
    first = data[0].cameras
    exact0 = world.render(first.c2w[:1], first.K[:1], first.height, first.width)
    inputs = SceneInputs(scene, trajectories, data, [], [], from_uint8(data[0].frames[0]), exact0.depth[0, 0],
                         first.K[0], first.c2w[0], world)
    held = held_out_targets(inputs, QualitySettings(held_out_views=novel))
    cams = Cameras(torch.cat([first.c2w[:1], held.cameras.c2w]), torch.cat([first.K[:1], held.cameras.K]),
                   first.height, first.width)
    return world, inputs, cams, exact0


def dot_grid(image: torch.Tensor) -> float:
    """The dot grid's contrast in an image at the input camera at SCALE x the data's size, (3,H,W) in [0, 1]: over
    the SCALE x SCALE pixel blocks that one input pixel (one input-head Gaussian, drawn at the block's centre)
    covers, the mean |centre 2 x 2 mean - border mean| of the block's grey, in 8-bit levels. A dot (or a gap around
    it) shows as a centre unlike its border, whichever is brighter; texture adds some to it too (see the exact
    render's value)."""
    grey = image.mean(dim=0)
    h, w = (grey.shape[0] // SCALE) * SCALE, (grey.shape[1] // SCALE) * SCALE
    blocks = grey[:h, :w].reshape(h // SCALE, SCALE, w // SCALE, SCALE).permute(0, 2, 1, 3)
    lo, hi = SCALE // 2 - 1, SCALE // 2 + 1
    centre = blocks[..., lo:hi, lo:hi].mean(dim=(-1, -2))
    border = (blocks.sum(dim=(-1, -2)) - centre * 4) / (SCALE * SCALE - 4)
    return float(255 * (centre - border).abs().mean())


def score(render: torch.Tensor, exact: torch.Tensor) -> list[float]:
    return [float(v) for v in psnr(render, exact).flatten()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="/tmp/h6")
    ap.add_argument("--scenes", default="proc-000000,proc-000001")
    ap.add_argument("--variants", default="raw,smooth0.2,floor0.35,floor0.48,split,split-bilinear")
    ap.add_argument("--shot-variants", default=None, help="variants to screenshot (default: all)")
    ap.add_argument("--novel", type=int, default=3)
    ap.add_argument("--shots", action="store_true", help="also screenshot the HTML viewer at 4x")
    ap.add_argument("--shot-cams", type=int, default=None, help="screenshot only the first N cameras")
    ap.add_argument("--keep-shots", default="0,1", help="cameras whose screenshots (first scene) are kept, cropped")
    ap.add_argument("--full", default="raw,smooth0.2", help="variants whose kept screenshots are kept uncropped")
    ap.add_argument("--crop", default="480,160,800,336", help="left,top,right,bottom of the kept crops (4x pixels)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "viewer_quality.json"))
    ap.add_argument("--work", default="/tmp/bench_viewer")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = RunStore(args.store, create=False)
    model, source = shipped_decoder()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shots_dir = Path(args.out).with_suffix("")
    shots_dir.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    shot_names = args.shot_variants.split(",") if args.shot_variants else names
    keep = {int(i) for i in args.keep_shots.split(",") if i}
    full = set(args.full.split(","))
    box = tuple(int(v) for v in args.crop.split(","))

    def save(image, path: Path, name: str | None, cam: int) -> None:  # viewer frames of --full at camera 0, else crops
        img = Image.fromarray(image)
        (img if name in full and cam == 0 else img.crop(box)).save(path)
    rows, timings = [], {}
    for si, scene in enumerate(args.scenes.split(",")):
        t0 = time.perf_counter()
        raw, views, trajectories = decode_scene(model, store, scene)
        timings.setdefault("decode_s", []).append(time.perf_counter() - t0)
        world, inputs, cams, exact0 = scene_cameras(store, scene, views, trajectories, args.novel)
        h, w = cams.height, cams.width
        c2w, K = cams.c2w[0], cams.K[0]
        bg = background_color(inputs.input_rgb, model.config.background)
        exact = from_uint8(to_uint8(world.render(cams.c2w, cams.K, h, w).rgb))
        big = cams.resized(SCALE * h, SCALE * w)
        exact_big = None
        if args.shots:
            t0 = time.perf_counter()
            exact_big = from_uint8(to_uint8(world.render(big.c2w, big.K, big.height, big.width).rgb))
            timings.setdefault("exact_big_s", []).append(time.perf_counter() - t0)
            rows.append({"scene": scene, "variant": "exact", "kind": "exact_4x", "dot_grid": dot_grid(exact_big[0])})
            refs = {"rgbd": rgbd_gaussians(inputs.input_rgb, exact0.depth[0, 0], K, c2w), "raw": raw}
            for ref, g in refs.items():
                t0 = time.perf_counter()
                out = render_gaussians(with_backdrop(g, c2w[:3, 3], bg), big, background=bg).rgb
                timings.setdefault("raster_big_s", []).append(time.perf_counter() - t0)
                row = {"scene": scene, "variant": ref, "kind": "our_raster_4x", "gaussians": g.num,
                       "psnr_4x": score(out, exact_big), "dot_grid": dot_grid(out[0])}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if si == 0:
                    for i in sorted(keep):
                        save(to_uint8(out[i]).permute(1, 2, 0).numpy(), shots_dir / f"{scene}_cam{i}_{ref}_ours.png",
                             None, i)
        raw_small = None
        for name in names:
            t0 = time.perf_counter()
            g = with_backdrop(variant(name, raw, c2w, K, h, w), c2w[:3, 3], bg)
            filter_s = time.perf_counter() - t0
            small = render_gaussians(g, cams, background=bg).rgb
            raw_small = small if name == "raw" else raw_small
            row = {"scene": scene, "variant": name, "kind": "export", "gaussians": g.num, "filter_s": filter_s,
                   "psnr": score(small, exact),
                   "psnr_vs_raw_render": score(small, raw_small) if raw_small is not None and name != "raw" else None}
            if args.shots and name in shot_names:
                ply = work / f"{scene}_{name}.ply"
                g.to_ply(ply)
                shots = []
                for i in range(len(cams) if args.shot_cams is None else args.shot_cams):
                    settings = viewer_settings(cams.c2w[i], cams.K[i], h, w, tuple(bg.tolist()))
                    sp = work / f"{scene}_{name}_cam{i}.viewer.json"
                    sp.write_text(json.dumps(settings))
                    t0 = time.perf_counter()
                    html = splat_transform(ply, work / f"{scene}_{name}_cam{i}.html", "-E", str(sp))
                    t1 = time.perf_counter()
                    shot = viewer_screenshot(html, SCALE * w, SCALE * h, timeout_s=240.0, settle_ms=4000)
                    timings.setdefault("splat_transform_s", []).append(t1 - t0)
                    timings.setdefault("screenshot_s", []).append(time.perf_counter() - t1)
                    html.unlink()
                    shot_t = torch.from_numpy(shot.copy()).permute(2, 0, 1).float()[None] / 255
                    shots.append(score(shot_t, exact_big[i : i + 1])[0])
                    if i == 0:
                        row["dot_grid_playcanvas"] = dot_grid(shot_t[0])
                    if si == 0 and i in keep:
                        save(shot, shots_dir / f"{scene}_cam{i}_{name}_playcanvas.png", name, i)
                row["psnr_4x_playcanvas"] = shots
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for row in rows:
        key = f"{row['kind']}:{row['variant']}"
        for metric in ("psnr", "psnr_vs_raw_render", "psnr_4x", "psnr_4x_playcanvas"):
            vals = row.get(metric)
            if vals:
                s = summary.setdefault(key, {})
                s.setdefault(metric + "_input", []).append(vals[0])
                s.setdefault(metric + "_novel", []).extend(vals[1:])
        if "dot_grid" in row or "dot_grid_playcanvas" in row:
            s = summary.setdefault(key, {})
            s.setdefault("dot_grid_input", []).append(row.get("dot_grid", row.get("dot_grid_playcanvas")))
    summary = {k: {m: sum(v) / len(v) for m, v in s.items() if v} for k, s in summary.items()}
    raw_sum = summary.get("export:raw", {})
    for s in summary.values():
        for split in ("input", "novel"):
            if f"psnr_{split}" in s and f"psnr_{split}" in raw_sum:
                s[f"delta_vs_raw_{split}"] = s[f"psnr_{split}"] - raw_sum[f"psnr_{split}"]
    doc = {"command": "python " + " ".join(sys.argv), "store": args.store, "decoder": source,
           "scenes": args.scenes.split(","), "novel_cameras": args.novel,
           "viewer_scale": SCALE, "torch_threads": args.threads, "summary_mean_db": summary,
           "timings_s": {k: [round(x, 2) for x in v] for k, v in timings.items()}, "rows": rows}
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
