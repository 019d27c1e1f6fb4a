"""The CPU compositing kernel of :mod:`lyra_ops.rasterize`: ``_raster_cpu.c``, built at first use, called via ctypes.

The C file needs no Python or torch headers, so a C compiler (``$CC``, else ``cc`` / ``gcc``) builds it in about
a second; the library is cached under ``$LYRA_KERNEL_CACHE`` (default ``~/.cache/lyra-pipeline/kernels``), named
by the sha256 of the source, the flags and the compiler's version, so an edited source or another compiler
builds anew. Without a compiler (or with ``LYRA_RASTER_KERNEL=torch``) :func:`kernel` returns None and the
rasterizer runs its pure torch compositor (same contract, slower).

Threads: the kernel starts ``torch.get_num_threads()`` POSIX threads per call (the count a refinement pins);
each (camera, tile) is composited by one thread and per-Gaussian gradients are summed serially in pair order,
so the bytes do not depend on the thread count or the schedule (no atomics), with or without torch's
deterministic mode. The flags keep IEEE semantics (no fast-math, no FMA contraction).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_raster_cpu.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-math-errno", "-std=c11")
NG = 10  # per-pair gradient sums (see _raster_cpu.c)
_lock = threading.Lock()
_state: dict[str, object] = {}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    env = os.environ.get("LYRA_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lyra-pipeline" / "kernels"


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + repr(FLAGS).encode() + version.encode()).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"raster_cpu-{key}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                                  check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed on {SOURCE.name}: {done.stderr.strip()[-2000:]}")
            os.replace(tmp, target)  # atomic: concurrent builders each write their own temp file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    for name in ("lyra_raster_forward", "lyra_raster_backward"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        fn.restype = ctypes.c_int
    for name in ("lyra_project_forward", "lyra_project_backward"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_double),
                       ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        fn.restype = ctypes.c_int
    return lib


def kernel() -> ctypes.CDLL | None:
    """The loaded library, or None when it is switched off (``LYRA_RASTER_KERNEL=torch``) or cannot be built (a
    warning says why, once per process)."""
    if os.environ.get("LYRA_RASTER_KERNEL", "auto") == "torch":
        return None
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _build()
            except (OSError, RuntimeError) as exc:
                _state["lib"] = None
                logger.warning("CPU rasterizer kernel unavailable (%s); using the pure torch compositor", exc)
        return _state["lib"]  # type: ignore[return-value]


def _ptrs(tensors: list[torch.Tensor]):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _dims(values: list[int]):
    return (ctypes.c_int64 * len(values))(*values)


class CpuCompositor(torch.autograd.Function):
    """Composite depth-sorted (Gaussian x tile) pairs with the C kernel (float32, CPU).

    Inputs: per (camera, Gaussian) ``means2d`` (C*N,2), ``conics`` (C*N,3), ``depths`` (C*N), ``radii`` (C*N,2)
    int32; per Gaussian ``opacities`` (N) and ``colors`` (N,3); pairs ``gid`` (K) int64 sorted by (camera, tile,
    depth), ``offsets`` (tiles+1) int64 and ``order`` (tiles) int64; ``geometry`` (N, tiles_x, tiles_y,
    tile_size, width, height, cameras). Returns ``acc`` (C,4,H,W) = sum w [r, g, b, z] and the final
    transmittance ``trans`` (C,H,W); differentiable in means2d, conics, opacities, colors and depths.
    """

    @staticmethod
    def forward(ctx, means2d, conics, opacities, colors, depths, radii, gid, offsets, order, geometry):  # type: ignore[override]
        n, tiles_x, tiles_y, tile_size, width, height, cams = geometry
        lib = kernel()
        ins = [t.detach().contiguous() for t in (means2d, conics, opacities, colors, depths)]
        acc = torch.empty(cams, 4, height, width, dtype=torch.float32)
        trans = torch.empty(cams, height, width, dtype=torch.float32)
        stop = torch.empty(cams, height, width, dtype=torch.int32)
        dims = [n, tiles_x, tiles_y, tile_size, width, height, cams * tiles_x * tiles_y]
        tensors = [offsets, order, gid, *ins, radii, acc, trans, stop]
        if lib.lyra_raster_forward(_dims(dims), _ptrs(tensors), torch.get_num_threads()) != 0:
            raise MemoryError("rasterizer kernel: out of memory")
        ctx.save_for_backward(*ins, radii, gid, offsets, order, trans, stop)
        ctx.dims = dims
        return acc, trans

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_acc, grad_trans):  # type: ignore[override]
        means2d, conics, opacities, colors, depths, radii, gid, offsets, order, trans, stop = ctx.saved_tensors
        grad_acc = torch.zeros_like(trans[:, None].expand(-1, 4, -1, -1)) if grad_acc is None else grad_acc
        grad_trans = torch.zeros_like(trans) if grad_trans is None else grad_trans
        grads = [torch.zeros_like(t) for t in (means2d, conics, opacities, colors, depths)]
        scratch = torch.empty(gid.numel(), NG, dtype=torch.float32)
        # slot 9 (the forward's acc) is not read by the backward
        tensors = [offsets, order, gid, means2d, conics, opacities, colors, depths, radii, trans, trans, stop,
                   grad_acc.contiguous(), grad_trans.contiguous(), scratch, *grads]
        if kernel().lyra_raster_backward(_dims(ctx.dims), _ptrs(tensors), torch.get_num_threads()) != 0:
            raise MemoryError("rasterizer kernel: out of memory")
        return (*grads, None, None, None, None, None)


class CpuProjection(torch.autograd.Function):
    """EWA projection of every Gaussian into every camera (``lyra_ops.rasterize.project_gaussians``) in C.

    Inputs: ``means`` (N,3), ``quats`` (N,4), ``scales`` (N,3), ``opacities`` (N), ``viewmats`` (C,4,4), ``Ks``
    (C,3,3), float32, and ``settings`` (width, height, near, far, eps2d). Returns means2d (C,N,2), conics (C,N,3),
    depths (C,N), radii (C,N,2) int32 and valid (C,N) bool; differentiable in means, quats and scales (not in
    the cameras: callers needing camera gradients use the torch projection). Outputs of invalid entries are 0.
    """

    @staticmethod
    def forward(ctx, means, quats, scales, opacities, viewmats, Ks, settings):  # type: ignore[override]
        width, height, near, far, eps2d = settings
        ins = [t.detach().contiguous() for t in (means, quats, scales, opacities, viewmats, Ks)]
        n, cams = ins[0].shape[0], ins[4].shape[0]
        means2d = torch.empty(cams, n, 2)
        conics = torch.empty(cams, n, 3)
        depths = torch.empty(cams, n)
        radii = torch.empty(cams, n, 2, dtype=torch.int32)
        valid = torch.empty(cams, n, dtype=torch.bool)
        dims, params = _dims([n, cams, width, height]), (ctypes.c_double * 3)(near, far, eps2d)
        kernel().lyra_project_forward(dims, params, _ptrs([*ins, means2d, conics, depths, radii, valid]),
                                      torch.get_num_threads())
        ctx.save_for_backward(*ins, means2d, conics, depths, radii, valid)
        ctx.settings = settings
        ctx.mark_non_differentiable(radii, valid)
        return means2d, conics, depths, radii, valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, v_means2d, v_conics, v_depths, _radii, _valid):  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        width, height, near, far, eps2d = ctx.settings
        n, cams = saved[0].shape[0], saved[4].shape[0]
        grads_in = [torch.zeros_like(t) if v is None else v.contiguous()
                    for v, t in ((v_means2d, saved[6]), (v_conics, saved[7]), (v_depths, saved[8]))]
        outs = [torch.empty_like(saved[i]) for i in range(3)]  # every Gaussian's row is written
        dims, params = _dims([n, cams, width, height]), (ctypes.c_double * 3)(near, far, eps2d)
        kernel().lyra_project_backward(dims, params, _ptrs([*saved, *grads_in, *outs]), torch.get_num_threads())
        return (*outs, None, None, None, None)
