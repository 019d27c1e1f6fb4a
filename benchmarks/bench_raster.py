"""Benchmark: the torch backend's two CPU compositors (the C kernel of ``lyra_ops.raster_kernel`` and the pure torch
one) in one run, forward and backward, and the dense reference; printed, never asserted.

    python benchmarks/bench_raster.py                       # 256x256, 10k / 30k / 100k Gaussians
    python benchmarks/bench_raster.py --sizes 50000 --tile-size 8 --repeats 5
    python benchmarks/bench_raster.py --width 320 --height 176 --sizes 80000 --cams 1 2 --threads 1 \
        --no-reference --out benchmarks/results/raster_cpu.json

Times are wall seconds (min / median over ``--repeats``) with process CPU seconds beside them; per Gaussian and
the ratio torch / kernel come from the same run. On float32 CPU the kernel is what ``rasterize`` uses; the
torch compositor is ``_rasterize_torch(..., kernel=False)``. ``--out``: the rows as JSON with the machine load
(``os.getloadavg``) before and after.

The dense reference costs (Gaussians x pixels); when that exceeds ``--ref-elements`` it renders only a band of
image rows and the time is extrapolated linearly to the full image (printed as such).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lyra_ops.gaussians import Gaussians  # noqa: E402
from lyra_ops.rasterize import (  # noqa: E402
    RasterOutput,
    _check_inputs,
    _rasterize_torch,
    rasterize_reference,
)


def make_scene(
    n: int,
    width: int,
    height: int,
    *,
    seed: int = 0,
    px_sigma: float = 1.5,
    device: str | torch.device = "cpu",
    cams: int = 1,
) -> tuple[Gaussians, torch.Tensor, torch.Tensor]:
    """N random Gaussians filling one camera's frustum (depth 2..10), with projected std ~``px_sigma`` pixels.

    Returns (Gaussians, viewmats (C,4,4): identity, then small sideways moves, Ks (C,3,3) with a ~58 degree
    horizontal FOV).
    """
    gen = torch.Generator().manual_seed(seed)
    f = 0.9 * width
    z = 2.0 + 8.0 * torch.rand(n, generator=gen)
    u = torch.rand(n, generator=gen) * width
    v = torch.rand(n, generator=gen) * height
    means = torch.stack([(u - width / 2) / f * z, (v - height / 2) / f * z, z], dim=1)
    scales = px_sigma * torch.exp(0.5 * torch.randn(n, 3, generator=gen)) * z[:, None] / f
    quats = torch.randn(n, 4, generator=gen)
    opacities = 0.05 + 0.95 * torch.rand(n, generator=gen)
    colors = torch.rand(n, 3, generator=gen)
    Ks = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])[None]
    g = Gaussians(means, scales, quats, opacities, colors).to(device)
    viewmats = torch.eye(4).repeat(cams, 1, 1)
    viewmats[:, 0, 3] = 0.05 * torch.arange(cams)
    return g, viewmats.to(device), Ks.repeat(cams, 1, 1).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward_backward(render, g: Gaussians, repeats: int, weights=None) -> dict:
    """Median/min forward (with autograd recording) and backward seconds of ``render(g)`` over ``repeats`` runs."""
    fwd, bwd, cfwd, cbwd = [], [], [], []
    out = None
    for _ in range(repeats):
        leaves = [
            t.detach().clone().requires_grad_(True)
            for t in (g.means, g.scales, g.quats, g.opacities, g.colors)
        ]
        gg = Gaussians(*leaves)
        _sync(g.device)
        t0, c0 = time.perf_counter(), time.process_time()
        out: RasterOutput = render(gg)
        _sync(g.device)
        t1, c1 = time.perf_counter(), time.process_time()
        loss = out.rgb.mean() + out.depth.mean() * 0.01 + out.alpha.mean()
        loss.backward()
        _sync(g.device)
        t2, c2 = time.perf_counter(), time.process_time()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        cfwd.append(c1 - c0)
        cbwd.append(c2 - c1)
    return {
        "fwd_min": min(fwd), "fwd_median": statistics.median(fwd),
        "bwd_min": min(bwd), "bwd_median": statistics.median(bwd), "out": out,
        "fwd_cpu_min": min(cfwd), "bwd_cpu_min": min(cbwd),
    }  # fmt: skip


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """PSNR in dB of ``a`` against ``b`` (inf when identical)."""
    mse = float(((a.detach().double() - b.detach().double()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--cams", type=int, nargs="+", default=[1], help="cameras rendered per call")
    parser.add_argument("--tile-size", type=int, default=16)
    parser.add_argument("--px-sigma", type=float, default=1.5, help="typical projected std in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ref-repeats", type=int, default=1)
    parser.add_argument("--ref-elements", type=float, default=3e7, help="max Gaussians x pixels per ref run")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--depth-chunk", type=int, default=None, help="torch compositor: Gaussians per tile and step"
    )
    parser.add_argument(
        "--step-elements", type=int, default=None, help="torch compositor: pixels x Gaussians per step"
    )
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    w, h = args.width, args.height
    load_before = os.getloadavg()
    print(
        f"# torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, {w}x{h}, "
        f"tile {args.tile_size}, px_sigma {args.px_sigma}, repeats {args.repeats} (wall min / median s, CPU s); "
        f"load {load_before[0]:.1f}"
    )
    kernels = [True, False] if device.type == "cpu" else [False]
    rows = []
    for cams in args.cams:
        for n in args.sizes:
            g, viewmats, Ks = make_scene(n, w, h, seed=args.seed, px_sigma=args.px_sigma, device=device,
                                         cams=cams)
            row: dict = {"gaussians": n, "cameras": cams, "width": w, "height": h}
            outs = {}
            for kernel in kernels:
                name = "kernel" if kernel else "torch"

                def render(gg: Gaussians, viewmats=viewmats, Ks=Ks, kernel=kernel) -> RasterOutput:
                    v, k, bg = _check_inputs(gg, viewmats, Ks, w, h, None, 0.01, 1e10, args.tile_size, 0.3)
                    return _rasterize_torch(
                        gg, v, k, w, h, bg, 0.01, 1e10, args.tile_size, 0.3,
                        depth_chunk=args.depth_chunk, step_elements=args.step_elements, kernel=kernel,
                    )  # fmt: skip

                fast = time_forward_backward(render, g, args.repeats)
                nograd = math.inf
                with torch.no_grad():
                    for _ in range(args.repeats):
                        _sync(device)
                        t0 = time.perf_counter()
                        render(g)
                        _sync(device)
                        nograd = min(nograd, time.perf_counter() - t0)
                outs[name] = fast["out"]
                row[name] = {k: v for k, v in fast.items() if k != "out"} | {
                    "fwd_nograd": nograd,
                    "us_per_gaussian_fwd": 1e6 * fast["fwd_min"] / n,
                    "us_per_gaussian_bwd": 1e6 * fast["bwd_min"] / n,
                }
                print(
                    f"N={n:>8d} C={cams} {name:>6}: fwd {fast['fwd_min']:.3f} / {fast['fwd_median']:.3f} "
                    f"(CPU {fast['fwd_cpu_min']:.3f})  bwd {fast['bwd_min']:.3f} / {fast['bwd_median']:.3f} "
                    f"(CPU {fast['bwd_cpu_min']:.3f})  fwd(no grad) {nograd:.3f}  "
                    f"{row[name]['us_per_gaussian_fwd']:.2f} + {row[name]['us_per_gaussian_bwd']:.2f} us/Gaussian",
                    flush=True,
                )
            if len(outs) == 2:
                k, t = row["kernel"], row["torch"]
                row["ratio_torch_over_kernel"] = {
                    "fwd": t["fwd_min"] / k["fwd_min"], "bwd": t["bwd_min"] / k["bwd_min"],
                    "fwd_cpu": t["fwd_cpu_min"] / k["fwd_cpu_min"], "bwd_cpu": t["bwd_cpu_min"] / k["bwd_cpu_min"],
                    "fwd+bwd": (t["fwd_min"] + t["bwd_min"]) / (k["fwd_min"] + k["bwd_min"]),
                }  # fmt: skip
                row["kernel_vs_torch_rgb_psnr"] = psnr(outs["kernel"].rgb, outs["torch"].rgb)
                r = row["ratio_torch_over_kernel"]
                print(f"N={n:>8d} C={cams} torch / kernel: fwd {r['fwd']:.2f}x  bwd {r['bwd']:.2f}x  fwd+bwd "
                      f"{r['fwd+bwd']:.2f}x  (CPU {r['fwd_cpu']:.2f}x / {r['bwd_cpu']:.2f}x)  rgb PSNR "
                      f"{row['kernel_vs_torch_rgb_psnr']:.1f} dB", flush=True)
            rows.append(row)
            if args.no_reference:
                continue
            fast = row["kernel" if "kernel" in row else "torch"]
            rows_ref = max(1, min(h, int(args.ref_elements // (n * w))))
            r0 = (h - rows_ref) // 2
            ref = time_forward_backward(
                lambda gg, viewmats=viewmats, Ks=Ks, r0=r0, rows=rows_ref: rasterize_reference(
                    gg, viewmats, Ks, w, h, rows=(r0, r0 + rows)
                ),
                g,
                args.ref_repeats,
            )
            scale = h / rows_ref
            ref_f, ref_b = ref["fwd_min"] * scale, ref["bwd_min"] * scale
            band = outs["kernel" if "kernel" in outs else "torch"].rgb[:, :, r0 : r0 + rows_ref]
            note = "measured" if rows_ref == h else f"extrapolated x{scale:.1f} from rows {r0}..{r0 + rows_ref - 1}"
            total = fast["fwd_min"] + fast["bwd_min"]
            print(
                f"N={n:>8d} dense : fwd {ref_f:.2f}  bwd {ref_b:.2f}  ({note})  "
                f"ratio fwd {ref_f / fast['fwd_min']:.1f}x  bwd {ref_b / fast['bwd_min']:.1f}x  "
                f"fwd+bwd {(ref_f + ref_b) / total:.1f}x  band PSNR rgb {psnr(band, ref['out'].rgb):.1f} dB",
                flush=True,
            )
    if args.out:
        doc = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(), "rows": rows}
        Path(args.out).write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
