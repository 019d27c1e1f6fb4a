"""One-shot GPU check of the rasterizers: parity of our torch backend with gsplat, and timings.

Run once on the rented H100/H200 machine (no network; gsplat installed from the carried wheel):

    python benchmarks/gpu_check.py                 # full run, about 7 minutes at most
    OUT=/some/dir python benchmarks/gpu_check.py   # JSON goes to $OUT/gpu_check.json (default ./gpu_out)
    python benchmarks/gpu_check.py --quick         # small sizes (also what runs on a CPU-only machine)

Sections, each guarded so that one failure keeps the others, the JSON rewritten after each:
  env       versions, device, nvcc
  compile   first gsplat call (JIT-compiles its CUDA code; in a background thread with a timeout)
  parity    256x256, 10k and 100k Gaussians: torch backend on CUDA and on CPU vs gsplat (PSNR of rgb / depth /
            alpha, relative gradient error per field); a small scene also vs the dense reference
  timing    256x256, 10k and 100k: gsplat vs torch (CUDA) vs torch (CPU), forward and backward
  big       704x1280: gsplat with 1M Gaussians (and our torch backend on CUDA if time allows)
  parity_big 704x1280, 200k Gaussians, torch (CUDA) vs gsplat, if time allows
Without CUDA only the CPU parts run (torch CPU vs the dense reference, CPU timings).
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # H100 / H200; must be set before gsplat compiles
os.environ.setdefault("MAX_JOBS", "16")

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

T0 = time.time()
ROOT = Path(__file__).resolve().parents[1]

# Load lyra_ops.gaussians / lyra_ops.rasterize without running lyra_ops/__init__.py, so this script needs
# nothing but torch and numpy whatever else the package grows to import.
if "lyra_ops" not in sys.modules:
    _pkg = types.ModuleType("lyra_ops")
    _pkg.__path__ = [str(ROOT / "lyra_ops")]
    sys.modules["lyra_ops"] = _pkg
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_raster import make_scene  # noqa: E402

from lyra_ops.gaussians import Gaussians  # noqa: E402
from lyra_ops.rasterize import RasterOutput, rasterize, rasterize_reference  # noqa: E402

FIELDS = ("means", "scales", "quats", "opacities", "colors")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", flush=True)


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


class Report:
    """Results dict written to ``path`` (atomically) after every section."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.time() - T0, 2)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_clean(self.data), indent=2))
        tmp.replace(self.path)

    def section(self, name: str, fn, *args) -> None:
        log(f"== {name}")
        t = time.time()
        entry: dict = {}
        self.data["sections"][name] = entry
        try:
            entry.update(fn(*args) or {})
            entry["status"] = entry.get("status", "ok")
        except Exception as exc:  # noqa: BLE001 - keep going, record what failed
            entry["status"] = "error"
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()[-3000:]
            log(f"   {name} FAILED: {entry['error']}")
        entry["seconds"] = round(time.time() - t, 2)
        self.write()
        log(f"   {name}: {json.dumps(_clean({k: v for k, v in entry.items() if k != 'traceback'}))[:3000]}")


# ---------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, mask: torch.Tensor | None = None) -> float:
    diff = (a.detach().double() - b.detach().double()) ** 2
    if mask is not None:
        diff = diff[mask.expand_as(diff)]
    mse = float(diff.mean()) if diff.numel() else 0.0
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def compare(a: RasterOutput, b: RasterOutput) -> dict:
    """Image agreement of ``a`` with ``b`` (b is the reference)."""
    a = RasterOutput(a.rgb.cpu(), a.depth.cpu(), a.alpha.cpu())
    b = RasterOutput(b.rgb.cpu(), b.depth.cpu(), b.alpha.cpu())
    dmax = max(float(b.depth.max()), 1e-6)
    covered = b.alpha > 0.5
    return {
        "psnr_rgb": round(psnr(a.rgb, b.rgb), 2),
        "psnr_alpha": round(psnr(a.alpha, b.alpha), 2),
        "psnr_depth": round(psnr(a.depth, b.depth, dmax), 2),
        "psnr_depth_alpha_gt_0.5": round(psnr(a.depth, b.depth, dmax, covered), 2),
        "max_abs_rgb": float((a.rgb - b.rgb).abs().max()),
        "max_abs_alpha": float((a.alpha - b.alpha).abs().max()),
        "depth_range": dmax,
        "mean_alpha_ref": float(b.alpha.mean()),
    }


def render_with_grads(backend: str, g: Gaussians, viewmats, Ks, w: int, h: int, weights, bg, device) -> tuple:
    """Render on ``device`` with ``backend``; return (output, grads per field, forward s, backward s)."""
    g = g.to(device)
    viewmats, Ks, bg = viewmats.to(device), Ks.to(device), bg.to(device)
    weights = [x.to(device) for x in weights]
    leaves = [getattr(g, f).detach().clone().requires_grad_(True) for f in FIELDS]
    gg = Gaussians(*leaves)
    sync()
    t0 = time.perf_counter()
    if backend == "reference":
        out = rasterize_reference(gg, viewmats, Ks, w, h, background=bg)
    else:
        out = rasterize(gg, viewmats, Ks, w, h, background=bg, backend=backend)
    sync()
    t1 = time.perf_counter()
    loss = (out.rgb * weights[0]).sum() + 0.1 * (out.depth * weights[1]).sum() + (out.alpha * weights[2]).sum()
    grads = torch.autograd.grad(loss, leaves)
    sync()
    t2 = time.perf_counter()
    out = RasterOutput(out.rgb.detach().cpu(), out.depth.detach().cpu(), out.alpha.detach().cpu())
    return out, [x.detach().cpu() for x in grads], t1 - t0, t2 - t1


def grad_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict:
    return {
        f: float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))
        for f, a, b in zip(FIELDS, got, want, strict=True)
    }


def time_backend(backend: str, g: Gaussians, viewmats, Ks, w: int, h: int, device, repeats: int) -> dict:
    """Forward (with autograd) and backward seconds, min and median over ``repeats`` after one warm-up."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(viewmats.shape[0], c, h, w, generator=gen) for c in (3, 1, 1)]
    bg = torch.ones(3)
    fwd, bwd = [], []
    for i in range(repeats + 1):
        _, _, tf, tb = render_with_grads(backend, g, viewmats, Ks, w, h, weights, bg, device)
        if i > 0 or repeats == 0:
            fwd.append(tf)
            bwd.append(tb)
    n = g.num
    return {
        "fwd_min_s": min(fwd), "fwd_median_s": statistics.median(fwd),
        "bwd_min_s": min(bwd), "bwd_median_s": statistics.median(bwd),
        "gaussians_per_s_fwd": n / min(fwd), "gaussians_per_s_fwd_bwd": n / (min(fwd) + min(bwd)),
        "repeats": len(fwd),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------


def section_env() -> dict:
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "env": {k: os.environ.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "TORCH_EXTENSIONS_DIR")},
    }
    try:
        info["gsplat"] = importlib.metadata.version("gsplat")
    except importlib.metadata.PackageNotFoundError:
        info["gsplat"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = list(torch.cuda.get_device_capability(0))
        info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        res = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=20)
        info["nvcc"] = res.stdout.strip().splitlines()[-1] if res.stdout else res.stderr.strip()[-200:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvcc"] = f"unavailable: {exc}"
    return info


class GsplatCompile:
    """The first gsplat call (JIT compile) in a background thread, so a slow build cannot eat the budget."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: dict = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t = time.time()
        try:
            import gsplat  # noqa: F401  (may JIT-compile on first use)

            g, viewmats, Ks = make_scene(64, 32, 32, device="cuda")
            leaves = [getattr(g, f).detach().clone().requires_grad_(True) for f in FIELDS]
            out = rasterize(Gaussians(*leaves), viewmats, Ks, 32, 32, backend="gsplat")
            (out.rgb.sum() + out.depth.sum()).backward()
            torch.cuda.synchronize()
            self.result = {"ok": True}
        except Exception as exc:  # noqa: BLE001
            self.result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        self.result["compile_and_first_call_s"] = round(time.time() - t, 1)
        self.done.set()

    def wait(self, timeout: float) -> dict:
        finished = self.done.wait(max(0.0, timeout))
        if not finished:
            return {"ok": False, "status": "still_compiling", "waited_s": round(timeout, 1)}
        return dict(self.result)


def section_compile(compiler: GsplatCompile, timeout: float) -> dict:
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA"}
    compiler.thread.start()
    res = compiler.wait(timeout)
    if res.get("ok") is False and "status" not in res:
        res["status"] = "error"
    return res


def section_parity(sizes: list[int], w: int, h: int, cpu_too: bool, gsplat_ok: bool) -> dict:
    out: dict = {}
    for n in sizes:
        g, viewmats, Ks = make_scene(n, w, h, seed=1)
        gen = torch.Generator().manual_seed(1)
        weights = [torch.randn(1, c, h, w, generator=gen) for c in (3, 1, 1)]
        bg = torch.ones(3)  # Lyra renders on white
        entry: dict = {"width": w, "height": h}
        ref_name = "gsplat_cuda" if gsplat_ok else ("torch_cuda" if torch.cuda.is_available() else "torch_cpu")
        runs: dict = {}
        if gsplat_ok:
            runs["gsplat_cuda"] = render_with_grads("gsplat", g, viewmats, Ks, w, h, weights, bg, "cuda")
        if torch.cuda.is_available():
            runs["torch_cuda"] = render_with_grads("torch", g, viewmats, Ks, w, h, weights, bg, "cuda")
        if cpu_too or not torch.cuda.is_available():
            runs["torch_cpu"] = render_with_grads("torch", g, viewmats, Ks, w, h, weights, bg, "cpu")
        ref_out, ref_grads = runs[ref_name][:2]
        for name, (o, gr, tf, tb) in runs.items():
            entry[name] = {"fwd_s": tf, "bwd_s": tb}
            if name != ref_name:
                entry[name][f"vs_{ref_name}"] = compare(o, ref_out)
                entry[name][f"grad_rel_err_vs_{ref_name}"] = grad_errors(gr, ref_grads)
        out[f"N={n}"] = entry
        log(f"   parity N={n}: {json.dumps(_clean(entry))[:1500]}")
    return out


def section_parity_reference(n: int, w: int, h: int, gsplat_ok: bool) -> dict:
    """Small scene: dense reference (CPU) vs torch (CPU, CUDA) and gsplat."""
    g, viewmats, Ks = make_scene(n, w, h, seed=2, px_sigma=2.5)
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(1, c, h, w, generator=gen) for c in (3, 1, 1)]
    bg = torch.ones(3)
    ref_out, ref_grads, _, _ = render_with_grads("reference", g, viewmats, Ks, w, h, weights, bg, "cpu")
    entry: dict = {"n": n, "width": w, "height": h}
    todo = [("torch_cpu", "torch", "cpu")]
    if torch.cuda.is_available():
        todo.append(("torch_cuda", "torch", "cuda"))
    if gsplat_ok:
        todo.append(("gsplat_cuda", "gsplat", "cuda"))
    for name, backend, device in todo:
        o, gr, _, _ = render_with_grads(backend, g, viewmats, Ks, w, h, weights, bg, device)
        entry[name] = {"vs_reference": compare(o, ref_out), "grad_rel_err_vs_reference": grad_errors(gr, ref_grads)}
    return entry


def section_timing(sizes: list[int], w: int, h: int, gsplat_ok: bool, cpu_repeats: int, cuda_repeats: int) -> dict:
    out: dict = {}
    for n in sizes:
        g, viewmats, Ks = make_scene(n, w, h, seed=3)
        entry: dict = {"width": w, "height": h}
        if gsplat_ok:
            entry["gsplat_cuda"] = time_backend("gsplat", g, viewmats, Ks, w, h, "cuda", cuda_repeats)
        if torch.cuda.is_available():
            entry["torch_cuda"] = time_backend("torch", g, viewmats, Ks, w, h, "cuda", cuda_repeats)
        entry["torch_cpu"] = time_backend("torch", g, viewmats, Ks, w, h, "cpu", cpu_repeats)
        out[f"N={n}"] = entry
        log(f"   timing N={n}: {json.dumps(_clean(entry))[:1500]}")
    return out


def section_big(n: int, w: int, h: int, gsplat_ok: bool, with_torch: bool, repeats: int) -> dict:
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA"}
    g, viewmats, Ks = make_scene(n, w, h, seed=4)
    entry: dict = {"n": n, "width": w, "height": h}
    if gsplat_ok:
        entry["gsplat_cuda"] = time_backend("gsplat", g, viewmats, Ks, w, h, "cuda", repeats)
    if with_torch:
        entry["torch_cuda"] = time_backend("torch", g, viewmats, Ks, w, h, "cuda", max(1, repeats // 2))
        entry["torch_cuda_peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU smoke test)")
    parser.add_argument("--budget-s", type=float, default=400.0, help="wall-clock budget of the whole run")
    parser.add_argument("--compile-timeout-s", type=float, default=300.0)
    parser.add_argument("--out", default=os.environ.get("OUT", "./gpu_out"))
    args = parser.parse_args(argv)
    report = Report(Path(args.out) / "gpu_check.json")
    report.data["args"] = vars(args)
    deadline = T0 + args.budget_s

    def left() -> float:
        return deadline - time.time()

    def run_if(name: str, need_s: float, fn, *fargs) -> None:
        if left() < need_s:
            report.data["sections"][name] = {"status": "skipped", "reason": f"{left():.0f}s left < {need_s}s"}
            report.write()
            log(f"== {name} skipped ({left():.0f}s left)")
            return
        report.section(name, fn, *fargs)

    cuda = torch.cuda.is_available()
    log(f"gpu_check: cuda={cuda}, quick={args.quick}, budget {args.budget_s}s, out {report.path}")
    report.section("env", section_env)

    compiler = GsplatCompile()
    report.section("compile", section_compile, compiler, min(args.compile_timeout_s, left() - 60))
    gsplat_ok = bool(report.data["sections"]["compile"].get("ok"))

    if args.quick:
        sizes, big_n, big_parity_n = [2_000], 50_000, 20_000
        w = h = 128
    else:
        sizes, big_n, big_parity_n = [10_000, 100_000], 1_000_000, 200_000
        w = h = 256
    run_if("parity_reference", 10, section_parity_reference, 1_000, 64, 48, gsplat_ok)
    run_if("parity", 20, section_parity, sizes, w, h, True, gsplat_ok)
    run_if("timing", 30, section_timing, sizes, w, h, gsplat_ok, 2, 5)

    if cuda and not gsplat_ok and not compiler.done.is_set():  # late compile: give it what we can spare
        res = compiler.wait(max(0.0, left() - 90))
        report.data["sections"]["compile_late"] = res
        report.write()
        gsplat_ok = bool(res.get("ok"))
        if gsplat_ok:
            run_if("parity_after_late_compile", 20, section_parity, sizes[:1], w, h, False, True)
            run_if("timing_after_late_compile", 20, section_timing, sizes[:1], w, h, True, 1, 3)

    run_if("big", 45, section_big, big_n, 1280, 704, gsplat_ok, left() > 120, 3)
    if cuda:
        run_if("parity_big", 40, section_parity, [big_parity_n], 1280, 704, False, gsplat_ok)
    report.data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report.write()
    log(f"done in {time.time() - T0:.1f}s; results in {report.path}")
    print(json.dumps(_clean(report.data), indent=2)[:20000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
