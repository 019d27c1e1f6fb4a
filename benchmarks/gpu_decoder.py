"""One decoder distillation step at the paper's scale: time and peak memory (run on a CUDA machine).

Random latents and Plücker tensors (the Cosmos tokenizer's 16 / 32 channels, or the embedded patchify
encoder's 1536 / 48), the `paper` decoder preset (attention blocks where mamba_ssm is missing), Gaussians
rendered into target views by our torch rasterizer (or gsplat), MSE loss, backward, AdamW step. The training
switches of `train.precision` (fp32 | bf16 autocast of the decoder forward; Gaussians rendered in fp32, as
`lyra_ops.distill.batch_loss` does) and `decoder_overrides.gradient_checkpointing` are measured as a grid.
Writes JSON to $OUT/gpu_decoder.json.

    python benchmarks/gpu_decoder.py --grid              # the switches x paper stage shapes (issue 17 item 6)
    python benchmarks/gpu_decoder.py                     # 704x1280, 121 frames, bf16 + checkpointing, 1-2 views
    python benchmarks/gpu_decoder.py --quick             # tiny CPU smoke of the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from lyra_ops.cameras import default_intrinsics
from lyra_ops.decoder import DecoderConfig, LatentGaussianDecoder
from lyra_ops.rasterize import rasterize
from lyra_ops.trajectories import make_trajectory


def step_stats(args: argparse.Namespace, device: torch.device) -> dict:
    h, w, t = args.height, args.width, args.frames
    t_l = 1 + (t - 1) // 8
    channels = {"cosmos": (16, 32), "patchify": (1536, 48)}[args.channels]
    cfg = DecoderConfig.preset(args.preset, latent_channels=channels[0], plucker_channels=channels[1],
                               gradient_checkpointing=args.checkpointing)
    bf16 = args.precision == "bf16"
    model = LatentGaussianDecoder(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    gen = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(args.views, channels[0], t_l, h // 8, w // 8, generator=gen).to(device)
    plucker = torch.randn(args.views, channels[1], t_l, h // 8, w // 8, generator=gen).to(device)
    K = default_intrinsics(h, w)
    names = ["left", "right", "up", "zoom_out", "zoom_in", "clockwise"]
    cams = [make_trajectory(names[i % 6], K, h, w, t, distance=0.25) for i in range(args.views)]
    idx = torch.linspace(0, t - 1, args.targets).round().long()
    viewmats = cams[0].w2c[idx].to(device)
    ks = cams[0].K[idx].to(device)
    target = torch.rand(args.targets, 3, h, w, generator=gen).to(device)
    bg = torch.ones(3, device=device)
    times = []
    for i in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            gaussians = model(latents, plucker, cams)
        gaussians = gaussians.to(dtype=torch.float32)
        out = rasterize(gaussians, viewmats, ks, w, h, background=bg, backend=args.backend, near=0.1, far=500.0)
        loss = torch.nn.functional.mse_loss(out.rgb, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # first step warms up kernels
            times.append(time.perf_counter() - t0)
    return {
        "preset": args.preset, "precision": args.precision, "checkpointing": args.checkpointing,
        "channels": args.channels, "size": [h, w], "frames": t, "views": args.views,
        "targets": args.targets, "backend": args.backend, "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "",
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "tokens": args.views * t_l * (h // 16) * (w // 16), "gaussians": gaussians.num,
        "step_s": times, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "loss": loss.item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--channels", default="cosmos", choices=["cosmos", "patchify"])
    ap.add_argument("--height", type=int, default=704)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--frames", type=int, default=121)
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--targets", type=int, default=9)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--backend", default="torch", choices=["torch", "gsplat"])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--grid", action="store_true", help="fp32/bf16 x checkpointing off/on at Lyra's stage shapes")
    ap.add_argument("--quick", action="store_true", help="tiny sizes on whatever device (script smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.height, args.width, args.frames, args.targets, args.steps = "tiny", 64, 96, 9, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(os.environ.get("OUT", "gpu_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    def variant(**kw) -> argparse.Namespace:
        return argparse.Namespace(**{**vars(args), **kw})

    if args.grid:
        switches = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]
        shapes = [{"height": 176, "width": 320, "frames": 17, "targets": 17} if not args.quick else {},
                  {"frames": 121 if not args.quick else 9}]
        runs = [variant(precision=p, checkpointing=c, **shape) for shape in shapes for p, c in switches]
        runs.append(variant(precision="bf16", checkpointing=True, views=2, frames=121 if not args.quick else 9))
    elif args.quick:
        runs = [args]
    else:
        runs = [args, variant(views=2)]
    for run in runs:
        try:
            res = step_stats(run, device)
        except Exception as exc:  # noqa: BLE001 - record (out of memory included) and go on to the next one
            res = {"views": run.views, "precision": run.precision, "checkpointing": run.checkpointing,
                   "frames": run.frames, "error": f"{type(exc).__name__}: {exc}"[:500]}
        results.append(res)
        print(json.dumps(res), flush=True)
        (out_dir / "gpu_decoder.json").write_text(json.dumps(results, indent=2))
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
