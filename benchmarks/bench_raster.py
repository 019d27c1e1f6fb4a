"""Benchmark: tile-based torch rasterizer vs the dense reference (forward and backward), printed, never asserted.

    python benchmarks/bench_raster.py                       # 256x256, 10k / 30k / 100k Gaussians
    python benchmarks/bench_raster.py --sizes 50000 --tile-size 8 --repeats 5

The dense reference costs (Gaussians x pixels); when that exceeds ``--ref-elements`` it renders only a band of
image rows and the time is extrapolated linearly to the full image (printed as such).
"""

from __future__ import annotations

import argparse
import math
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
) -> tuple[Gaussians, torch.Tensor, torch.Tensor]:
    """N random Gaussians filling one camera's frustum (depth 2..10), with projected std ~``px_sigma`` pixels.

    Returns (Gaussians, viewmats (1,4,4) identity, Ks (1,3,3) with a ~58 degree horizontal FOV).
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
    return g, torch.eye(4)[None].to(device), Ks.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward_backward(render, g: Gaussians, repeats: int, weights=None) -> dict:
    """Median/min forward (with autograd recording) and backward seconds of ``render(g)`` over ``repeats`` runs."""
    fwd, bwd = [], []
    out = None
    for _ in range(repeats):
        leaves = [
            t.detach().clone().requires_grad_(True)
            for t in (g.means, g.scales, g.quats, g.opacities, g.colors)
        ]
        gg = Gaussians(*leaves)
        _sync(g.device)
        t0 = time.perf_counter()
        out: RasterOutput = render(gg)
        _sync(g.device)
        t1 = time.perf_counter()
        loss = out.rgb.mean() + out.depth.mean() * 0.01 + out.alpha.mean()
        loss.backward()
        _sync(g.device)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    return {
        "fwd_min": min(fwd), "fwd_median": statistics.median(fwd),
        "bwd_min": min(bwd), "bwd_median": statistics.median(bwd), "out": out,
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
        "--depth-chunk", type=int, default=None, help="torch backend: Gaussians per tile and step"
    )
    parser.add_argument(
        "--step-elements", type=int, default=None, help="torch backend: pixels x Gaussians per step"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    w, h = args.width, args.height
    print(
        f"# torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, {w}x{h}, "
        f"tile {args.tile_size}, depth chunk {args.depth_chunk or 'default'}, step elements "
        f"{args.step_elements or 'default'}, px_sigma {args.px_sigma}, repeats {args.repeats} (min / median s)"
    )
    for n in args.sizes:
        g, viewmats, Ks = make_scene(n, w, h, seed=args.seed, px_sigma=args.px_sigma, device=device)

        def render(gg: Gaussians, viewmats=viewmats, Ks=Ks) -> RasterOutput:
            v, k, bg = _check_inputs(gg, viewmats, Ks, w, h, None, 0.01, 1e10, args.tile_size, 0.3)
            return _rasterize_torch(
                gg, v, k, w, h, bg, 0.01, 1e10, args.tile_size, 0.3,
                depth_chunk=args.depth_chunk, step_elements=args.step_elements,
            )  # fmt: skip

        fast = time_forward_backward(render, g, args.repeats)
        with torch.no_grad():
            _sync(device)
            t0 = time.perf_counter()
            render(g)
            _sync(device)
            nograd = time.perf_counter() - t0
        total = fast["fwd_min"] + fast["bwd_min"]
        print(
            f"N={n:>8d} torch : fwd {fast['fwd_min']:.3f} / {fast['fwd_median']:.3f}  "
            f"bwd {fast['bwd_min']:.3f} / {fast['bwd_median']:.3f}  fwd(no grad) {nograd:.3f}  "
            f"{n / fast['fwd_min']:.3g} Gaussians/s fwd, {n / total:.3g} fwd+bwd  "
            f"mean alpha {float(fast['out'].alpha.detach().mean()):.3f}",
            flush=True,
        )
        if args.no_reference:
            continue
        rows = max(1, min(h, int(args.ref_elements // (n * w))))
        r0 = (h - rows) // 2
        ref = time_forward_backward(
            lambda gg, viewmats=viewmats, Ks=Ks, r0=r0, rows=rows: rasterize_reference(
                gg, viewmats, Ks, w, h, rows=(r0, r0 + rows)
            ),
            g,
            args.ref_repeats,
        )
        scale = h / rows
        ref_f, ref_b = ref["fwd_min"] * scale, ref["bwd_min"] * scale
        band = fast["out"].rgb[:, :, r0 : r0 + rows]
        note = "measured" if rows == h else f"extrapolated x{scale:.1f} from rows {r0}..{r0 + rows - 1}"
        print(
            f"N={n:>8d} dense : fwd {ref_f:.2f}  bwd {ref_b:.2f}  ({note})  "
            f"ratio fwd {ref_f / fast['fwd_min']:.1f}x  bwd {ref_b / fast['bwd_min']:.1f}x  "
            f"fwd+bwd {(ref_f + ref_b) / total:.1f}x  band PSNR rgb {psnr(band, ref['out'].rgb):.1f} dB",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
