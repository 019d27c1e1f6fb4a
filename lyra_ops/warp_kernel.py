"""The CPU kernels of :mod:`lyra_ops.warp` and :mod:`lyra_ops.mask_refine`: ``_warp_cpu.c``, built at first use
and called via ctypes, like the rasterizer's (:mod:`lyra_ops.raster_kernel`: the same compiler lookup, ``$CC``
then ``cc`` / ``gcc`` / ``clang``, and cache, ``$LYRA_KERNEL_CACHE`` or ``~/.cache/lyra-pipeline/kernels``, the
library named by the sha256 of the source, the flags and the compiler's version; no Python or torch headers).

Without a compiler (or with ``LYRA_WARP_KERNEL=torch``) :func:`kernel` returns None and the ops run their pure
torch implementations (same contract, slower). Threads: ``torch.get_num_threads()`` POSIX threads per call; the
bytes of the results do not depend on the thread count (see the C file).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

from lyra_ops import raster_kernel

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_warp_cpu.c")
# IEEE semantics (no fast-math, no FMA contraction: the projection must round like the reference's).
FLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-math-errno", "-std=c11")
_compiler, _cache_dir = raster_kernel._compiler, raster_kernel._cache_dir  # one lookup for every kernel
_lock = threading.Lock()
_state: dict[str, object] = {}
_SIGNATURES = {
    "lyra_warp_points": ([ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p)], ctypes.c_int),
    "lyra_warp_splat": ([ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
                        ctypes.c_int),
    "lyra_mesh_depth": ([ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
                        ctypes.c_int),
    "lyra_refine_apply": ([ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p)], ctypes.c_int),
}


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
    lib, _ = raster_kernel.build_library(cc, SOURCE, "warp_cpu", (FLAGS,), _cache_dir())
    for name, (argtypes, restype) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype
    return lib


def kernel() -> ctypes.CDLL | None:
    """The loaded library, or None when it is switched off (``LYRA_WARP_KERNEL=torch``) or cannot be built (a
    warning says why, once per process)."""
    return raster_kernel.cached_library("LYRA_WARP_KERNEL", _state, _lock, _build, "warp")


def ptrs(tensors: list) -> ctypes.Array:
    """A C array of the tensors' data pointers (the caller keeps the tensors alive and contiguous)."""
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def dims(values: list[int]) -> ctypes.Array:
    """A C array of int64."""
    return (ctypes.c_int64 * len(values))(*values)
