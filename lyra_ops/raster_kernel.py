"""The CPU kernels of :mod:`lyra_ops.rasterize`: ``_raster_cpu.c`` (projection, tile binning, compositing forward
and backward, float32), built at first use with the C compiler and called via ctypes.

Why built at first use and not by pip: the C file needs no Python or torch headers, so any C compiler (``$CC``,
else ``cc`` / ``gcc`` / ``clang``) builds it in about a second, for the Python and torch the process actually
runs; the package stays pure Python (one wheel for every platform, nothing to build in editable installs, test
checkouts or a clean clone), and a machine without a compiler still works: :func:`kernel` returns None, with one
warning, and the rasterizer runs its pure torch compositor (same contract, slower). ``LYRA_RASTER_KERNEL=torch``
forces that path. An image whose runtime has no compiler can build it ahead with ``python -m
lyra_ops.raster_kernel`` (into ``$LYRA_KERNEL_CACHE``). (The source must ship with the package: package data.)

Cache: ``$LYRA_KERNEL_CACHE`` (default ``~/.cache/lyra-pipeline/kernels``; a private temporary folder when that
cannot be created), the library named by the sha256 of the source, the flags and the compiler's version, so an
edited source or another compiler builds anew. Concurrent builders (threads or processes) are safe: each
compiles into its own temporary file and renames it into place atomically; a reader only ever opens a complete
library.

Threads: every call runs on ``torch.get_num_threads()`` threads. Built with OpenMP (tried first), they are the
threads of the OpenMP pool torch's own ops use (torch's libgomp is already loaded, so the library binds to it),
not a second set competing with torch's spinning workers for the cores; without OpenMP, POSIX threads. Each
(camera, tile) is composited by one thread, each Gaussian projected by one, binning is serial, and per-Gaussian
gradients are summed serially in pair order, so the bytes do not depend on the thread count or the schedule (no
atomics), with or without torch's deterministic mode. The flags keep IEEE semantics (no fast-math, no FMA
contraction).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
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


OPENMP = ("-fopenmp",)  # tried first; without it the library starts POSIX threads


def _compile(cc: str, flags: tuple[str, ...], folder: Path, key: str, source: Path | None = None,
             stem: str = "raster_cpu") -> Path:
    source = SOURCE if source is None else source
    target = folder / f"{stem}-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".build-", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, str(source), "-o", tmp, "-lm"], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed on {source.name}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: concurrent builders each write their own temp file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def build_library(cc: str, source: Path, stem: str, flag_sets: tuple[tuple[str, ...], ...],
                  cache: Path) -> tuple[ctypes.CDLL, Path]:
    """Compile ``source`` with the first of ``flag_sets`` that works into ``cache`` (a private temporary folder
    when that cannot be written), named ``<stem>-<sha256 of source, flags, compiler version>.so``, and load it.
    Shared by every CPU kernel of the package (:mod:`lyra_ops.warp_kernel` too)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    data = source.read_bytes()
    error: Exception | None = None
    for flags in flag_sets:
        key = hashlib.sha256(data + repr(flags).encode() + version.encode()).hexdigest()[:16]
        try:
            try:
                target = _compile(cc, flags, cache, key, source, stem)
            except OSError:  # the cache cannot be written: build for this process only
                target = _compile(cc, flags, Path(tempfile.mkdtemp(prefix="lyra-kernels-")), key, source, stem)
            return ctypes.CDLL(str(target)), target
        except (OSError, RuntimeError) as exc:
            error = exc
    raise error  # type: ignore[misc]


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
    lib, target = build_library(cc, SOURCE, "raster_cpu", ((*FLAGS, *OPENMP), FLAGS), _cache_dir())
    _state["path"] = str(target)
    for name in ("lyra_raster_forward", "lyra_raster_backward"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        fn.restype = ctypes.c_int
    for name in ("lyra_project_forward", "lyra_project_backward"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_double),
                       ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        fn.restype = ctypes.c_int
    for name in ("lyra_bin_count", "lyra_bin_fill"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p)]
        fn.restype = ctypes.c_int
    return lib


def cached_library(switch: str, state: dict, lock: threading.Lock, build, what: str) -> ctypes.CDLL | None:
    """``build()``'s library, built once per process into ``state`` under ``lock``; None when the environment
    variable ``switch`` is ``torch`` or the build fails (one warning naming ``what`` falls back)."""
    if os.environ.get(switch, "auto") == "torch":
        return None
    with lock:
        if "lib" not in state:
            try:
                state["lib"] = build()
            except (OSError, RuntimeError) as exc:
                state["lib"] = None
                logger.warning("CPU %s kernel unavailable (%s); using the pure torch %s", what, exc,
                               "compositor" if what == "rasterizer" else what)
        return state["lib"]  # type: ignore[return-value]


def kernel() -> ctypes.CDLL | None:
    """The loaded library, or None when it is switched off (``LYRA_RASTER_KERNEL=torch``) or cannot be built (a
    warning says why, once per process)."""
    return cached_library("LYRA_RASTER_KERNEL", _state, _lock, _build, "rasterizer")


_local = threading.local()  # per Python thread, like torch's own count: the use_threads overrides in force


def threads() -> int:
    """The thread count of the next kernel call: :func:`use_threads`'s, else ``torch.get_num_threads()``."""
    stack = getattr(_local, "stack", None)
    return (stack[-1] if stack else None) or torch.get_num_threads()


@contextlib.contextmanager
def use_threads(count: int | None) -> Iterator[None]:
    """Run the kernels on ``count`` threads inside the block (None: torch's count), whatever torch's own ops run
    at: e.g. torch's many small per-step ops on one thread (no OpenMP barriers to wait at on a busy machine) and
    the kernels, where the time goes, on every core. The kernels' bytes do not depend on the count."""
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(count)
    try:
        yield
    finally:
        stack.pop()


def _ptrs(tensors: list[torch.Tensor]):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _dims(values: list[int]):
    return (ctypes.c_int64 * len(values))(*values)


@torch.no_grad()
def bin_tiles(means2d: torch.Tensor, radii: torch.Tensor, valid: torch.Tensor, depths: torch.Tensor,
              tile_size: int, tiles_x: int, tiles_y: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Gaussian x tile) pairs of ``lyra_ops.rasterize._intersect_tiles`` in C: ``gid`` (K) int64 flat c*N + n,
    sorted by (camera, tile, depth, index), and ``offsets`` (C*tiles + 1) int64 (tile t's pairs are
    ``gid[offsets[t]:offsets[t+1]]``). Inputs per (camera, Gaussian): means2d (C,N,2), radii (C,N,2) int32,
    valid (C,N) bool, depths (C,N)."""
    cams, n = depths.shape
    m2, rad = means2d.detach().contiguous(), radii.contiguous()
    ok, dep = valid.contiguous(), depths.detach().contiguous()
    counts = torch.empty(cams * tiles_x * tiles_y, dtype=torch.int64)
    dims = _dims([n, cams, tile_size, tiles_x, tiles_y])
    lib = kernel()
    lib.lyra_bin_count(dims, _ptrs([m2, rad, ok, counts]))
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    gid = torch.empty(int(offsets[-1]), dtype=torch.int64)
    if lib.lyra_bin_fill(dims, _ptrs([m2, rad, ok, dep, offsets, gid])) != 0:
        raise MemoryError("rasterizer kernel: out of memory")
    return gid, offsets


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
        if lib.lyra_raster_forward(_dims(dims), _ptrs(tensors), threads()) != 0:
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
        if kernel().lyra_raster_backward(_dims(ctx.dims), _ptrs(tensors), threads()) != 0:
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
                                      threads())
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
        kernel().lyra_project_backward(dims, params, _ptrs([*saved, *grads_in, *outs]), threads())
        return (*outs, None, None, None, None)


if __name__ == "__main__":  # build ahead (e.g. into an image's $LYRA_KERNEL_CACHE) and say where it is
    if kernel() is None:
        raise SystemExit("raster kernel: not built (see the warning above)")
    print(_state["path"])
