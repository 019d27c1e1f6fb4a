"""Benchmark: GEN3C-conditioned video generation with the diffusers backend: seconds per frame, peak memory.

Builds a random-initialised Wan checkpoint in the layout of a real one (``--size tiny``: the test model;
``--size wan-1.3b``: Wan 2.1 T2V 1.3B's transformer configuration, 30 layers x 1536, with a tiny VAE/text encoder,
for GPU runs) and generates one trajectory at the given size. Printed and written as JSON, never asserted.

    python benchmarks/bench_generation.py                                   # tiny, CPU, 9 x 64 x 64, 4 steps
    python benchmarks/bench_generation.py --size tiny-teacher --frames 25 --height 176 --width 320 --steps 8
    python benchmarks/bench_generation.py --size wan-1.3b --device cuda --dtype bfloat16 --frames 121 \\
        --height 704 --width 1280 --steps 2 --cpu-offload                   # does 121 x 704 x 1280 fit?
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lyra_ops.cameras import default_intrinsics  # noqa: E402
from lyra_ops.trajectories import make_trajectory  # noqa: E402
from lyra_pipeline.backends.diffusers_video import DiffusersVideoGenerator  # noqa: E402
from lyra_pipeline.backends.tiny import make_tiny_wan  # noqa: E402

WAN_1_3B = {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30,
            "text_dim": 32, "freq_dim": 256}


def make_checkpoint(size: str, folder: Path) -> Path:
    path = make_tiny_wan(folder / "ckpt")
    if size == "wan-1.3b":
        from diffusers import WanTransformer3DModel

        WanTransformer3DModel(in_channels=16, out_channels=16, **WAN_1_3B).save_pretrained(path / "transformer")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "wan-1.3b", "tiny-teacher"], default="tiny",
                    help="tiny-teacher: the shipped pixel-space teacher (generator.backend tiny)")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--cpu-offload", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.size == "tiny-teacher":
            from lyra_pipeline.backends.tiny_teacher import TinyTeacherGenerator, load_teacher

            gen = TinyTeacherGenerator(steps=args.steps, device=args.device)
            model = load_teacher(gen.path, args.device)[0]
            gen.generate_with_latents = lambda *a, **k: (gen.generate(*a, **k), None)
        else:
            path = make_checkpoint(args.size, Path(tmp))
            gen = DiffusersVideoGenerator(str(path), steps=args.steps, guidance=args.guidance, device=args.device,
                                          dtype=args.dtype, cpu_offload=args.cpu_offload, max_text_tokens=64)
            model = gen.pipeline().transformer
        load_s = time.perf_counter() - t0
        h, w, t = args.height, args.width, args.frames
        cams = make_trajectory("left", default_intrinsics(h, w), h, w, t, distance=0.2)
        g = torch.Generator().manual_seed(0)
        first = torch.rand(3, h, w, generator=g)
        warped = torch.rand(t, 3, h, w, generator=g) * 2 - 1
        mask = torch.rand(t, 1, h, w, generator=g) > 0.3
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.repeats):
            t1 = time.perf_counter()
            gen.generate_with_latents(first, "a living room", cams, warped, mask, seed=i)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t1)
        params = sum(p.numel() for p in model.parameters())
        result = {
            "size": args.size, "transformer_params": params, "frames": t, "height": h, "width": w,
            "steps": args.steps, "guidance": args.guidance, "device": args.device, "dtype": args.dtype,
            "load_s": load_s, "seconds_per_video": min(times), "seconds_per_frame": min(times) / t,
            "seconds_per_frame_per_step": min(times) / t / args.steps,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cuda_gib": (torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None),
            "torch_threads": torch.get_num_threads(),
        }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
