"""Benchmark: how much could knowing time add to a dynamic decoding? (issue 16)

A decoding at query frame t in the ``query+keyframes`` layout holds, besides frame t's Gaussians, Gaussians of the
other keyframes (other times), kept where the input of their own time did not see. For moving objects those
show the object where it was at that other time: the only part of the output that a time-conditioned decoder
could fix and a static one cannot. This script scores, on the same held-out scenes, query frames and seeded
cameras as ``bench_dynamic.py``, each decoder (the shipped static one, and ``--checkpoint``) as decoded and with an
oracle that drops every other-time Gaussian whose pixel block shows a moving object at its own time (exact
object ids of the procedural scene, rendered from that frame's camera). The oracle's gain bounds what learning to
fade other times' moving objects could give on this layout. Writes ``--out``; never asserts.

    python benchmarks/bench_dynamic_headroom.py --store /work/data/dyn24 --scenes dyn-000000,dyn-000001 \\
        --checkpoint /work/data/dyn24/train/<run>/checkpoints/step-00000400/model.safetensors
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lyra_ops.decoder import fused_keep, query_frames, with_time_frames  # noqa: E402
from lyra_ops.distill import background_color, batch_to, build_dynamic_batch  # noqa: E402
from lyra_ops.latents import PixelPatchifyEncoder  # noqa: E402
from lyra_pipeline.dynamic_quality import (  # noqa: E402
    DynamicQualitySettings,
    _scores,
    dynamic_world,
    frame_targets,
)
from lyra_pipeline.quality import render_gaussians  # noqa: E402
from lyra_pipeline.shipped import shipped_decoder  # noqa: E402
from lyra_pipeline.storage import RunStore  # noqa: E402
from lyra_pipeline.training import ViewCache, forward_paths, load_decoder_bytes, scene_trajectories  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def moving_blocks(world, cams, frame: int, time: float, stride: int, moving_ids: set[int]) -> torch.Tensor:
    """(h, w) bool: the ``stride`` blocks of camera ``frame`` of ``cams`` that show a moving object at ``time``."""
    out = world.render(cams.c2w[[frame]], cams.K[[frame]], cams.height, cams.width, [time])
    hit = torch.zeros_like(out.depth, dtype=torch.bool)
    for obj in moving_ids:
        hit |= out.object_id == obj
    return F.max_pool2d(hit[0].float(), stride)[0] > 0


def decode_both(model, world, input_view, paths, times, frame: int) -> dict[str, object]:
    """The decoding at ``frame`` as is, and with other-time Gaussians on moving objects dropped (oracle)."""
    cfg = model.config
    batch = batch_to(build_dynamic_batch(input_view, paths, [], frame, times, PixelPatchifyEncoder(), cfg.background),
                     "cpu")
    with torch.no_grad():
        whole = model.forward_at(batch.latents, batch.plucker, list(batch.input_cameras), batch.times, frame,
                                 known_depth=batch.known_depth, prune=False)
    t_l = int(batch.latents.shape[2])
    frames = query_frames(cfg, t_l, frame)
    keep = fused_keep(cfg, batch.known_depth, frames)
    moving_ids = {m.obj_id for m in world.motions}
    g = cfg.gaussian_stride
    h, w = input_view.cameras.height // g, input_view.cameras.width // g
    head = keep.numel() - len(batch.input_cameras) * len(frames) * h * w
    grid = keep[head:].reshape(len(batch.input_cameras), len(frames), h, w).clone()
    for v, cams in enumerate(batch.input_cameras):
        for i, f in enumerate(frames):
            if f != frame:
                grid[v, i] &= ~moving_blocks(world, cams, f, float(times[f]), g, moving_ids)
    oracle = torch.cat([keep[:head], grid.reshape(-1)])
    dedup = drawn_at_query(whole, keep, head, len(batch.input_cameras), len(frames), h, w, batch.input_cameras,
                           frame)
    return {"decoded": whole.index(keep), "oracle": whole.index(oracle), "dedup": whole.index(keep & ~dedup),
            "dropped": int(keep.sum() - oracle.sum()), "deduped": int(dedup.sum()), "kept": int(keep.sum())}


def drawn_at_query(whole, keep, head: int, views: int, frames: int, h: int, w: int, cameras, frame: int,
                   tolerance: float = 0.05) -> torch.Tensor:
    """Other-time Gaussians on a surface the query frame's own Gaussians already draw: rendered into any view's
    camera at the query frame, they land where that view's query-time Gaussians (alpha > 0.5) lie within
    ``tolerance`` of their depth. (whole,) bool."""
    idx = torch.arange(keep.numel())
    slot = torch.full((keep.numel(),), -1)
    slot[head:] = torch.arange(frames).repeat_interleave(h * w).repeat(views)
    own = keep & ((idx < head) | (slot == 0))  # the input head and every view's query frame
    other = keep & (slot > 0)
    query = whole.index(own)
    out = torch.zeros_like(keep)
    pts = whole.means[other]
    hit = torch.zeros(len(pts), dtype=torch.bool)
    for cams in cameras:
        cam = cams[torch.tensor([frame])]
        r = render_gaussians(query, cam)
        w2c = cam.w2c[0].to(pts)
        pc = pts @ w2c[:3, :3].T + w2c[:3, 3]
        z = pc[:, 2]
        k = cam.K[0].to(pts)
        u = torch.round(k[0, 0] * pc[:, 0] / z.clamp(min=1e-6) + k[0, 2] - 0.5).long()
        v = torch.round(k[1, 1] * pc[:, 1] / z.clamp(min=1e-6) + k[1, 2] - 0.5).long()
        inside = (z > 0) & (u >= 0) & (u < cam.width) & (v >= 0) & (v < cam.height)
        uu, vv = u.clamp(0, cam.width - 1), v.clamp(0, cam.height - 1)
        d, a = r.depth[0, 0, vv, uu], r.alpha[0, 0, vv, uu]
        hit |= inside & (a > 0.5) & ((z - d).abs() < tolerance * d)
    out[other] = hit
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--scenes", required=True)
    ap.add_argument("--checkpoint", default=None, help="dynamic decoder .safetensors")
    ap.add_argument("--frames", default="3,12,21")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dynamic_headroom.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = RunStore(args.store, create=False)
    models = {"static_query+keyframes": with_time_frames(shipped_decoder()[0], "query+keyframes")}
    if args.checkpoint:
        models["dynamic"] = load_decoder_bytes(Path(args.checkpoint).read_bytes(), args.checkpoint).eval()
    settings = DynamicQualitySettings(frames=tuple(int(f) for f in args.frames.split(",")), optimize_steps=())
    rows = []
    for scene in args.scenes.split(","):
        views = ViewCache(store)
        world = dynamic_world(store, scene)
        names = scene_trajectories(store, scene)
        input_view, times = views.input_view(scene)
        paths = [views.get(scene, n) for n in forward_paths(names)]
        for frame in settings.frames:
            targets = frame_targets(world, names, scene, views, frame, settings)
            bg = background_color(input_view.frames[frame], "input_mean")
            for name, model in models.items():
                out = decode_both(model, world, input_view, paths, times, frame)
                for variant in ("decoded", "oracle", "dedup"):
                    for t in targets:
                        r = render_gaussians(out[variant], t.cameras, background=bg)
                        rows.append({"scene": scene, "frame": frame, "split": t.split, "method": name,
                                     "variant": variant, "dropped": out["dropped"], "deduped": out["deduped"],
                                     "kept": out["kept"],
                                     **_scores(r.rgb, r.depth, r.alpha, t)})
                print(scene, frame, name, out["deduped"],
                      [f"{r['split']} {r['variant']} {r['psnr']:.3f}" for r in rows[-6:]],
                      flush=True)
    table = []
    for split in ("held_out", "flip"):
        for name in models:
            for variant in ("decoded", "oracle", "dedup"):
                sel = [r for r in rows if r["split"] == split and r["method"] == name and r["variant"] == variant]
                table.append({"split": split, "method": name, "variant": variant,
                              "psnr": statistics.mean(r["psnr"] for r in sel),
                              "moving_psnr": statistics.mean(r["moving_psnr"] for r in sel
                                                             if r["moving_psnr"] == r["moving_psnr"]),
                              "depth_absrel": statistics.mean(r["depth_absrel"] for r in sel),
                              "dropped_share": statistics.mean(r["dropped"] / r["kept"] for r in sel)})
                print(json.dumps(table[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"store": args.store, "scenes": args.scenes.split(","),
                                          "checkpoint": args.checkpoint, "table": table, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
