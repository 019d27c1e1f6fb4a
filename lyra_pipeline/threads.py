"""How every computation sets torch's intra-op threads: :func:`pin_torch_threads` (and :func:`exact_cpu`).

On CPU a result can depend on the threads that computed it, two ways:

* the count: a reduction split over 2 threads adds its floats in another order than over 1, so an optimiser
  step ends a few ulps apart, and after a few hundred steps the Gaussians differ visibly;
* the schedule: with more than one thread, ``index_put_(accumulate=True)`` on float tensors (the backward of a
  gather ``x[idx]``, e.g. in the rasterizer's backward) adds with atomics in whatever order the threads reach
  them, so two runs at the same count differ; torch's deterministic kernels (``use_deterministic_algorithms``)
  add serially instead.

``torch.set_num_threads`` is process-wide state, so a computation must not inherit it from whatever ran before
it in the process (e.g. an SDG stage that had work pins it, one that was already done does not): each one pins
its own count right before it computes, in the thread that computes (OpenMP keeps the count per thread once
that thread has run a parallel op). A computation that must resume to the same bytes (per-scene refinement,
decoder and teacher training on CPU) also runs inside :func:`exact_cpu`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_DEFAULT: int | None = None


def default_threads() -> int:
    """torch's own intra-op thread count in this process (``OMP_NUM_THREADS``, else the cores), as it was the
    first time this module was asked: before any :func:`pin_torch_threads` changed it."""
    global _DEFAULT
    if _DEFAULT is None:
        import torch

        _DEFAULT = torch.get_num_threads()
    return _DEFAULT


def resolve_threads(threads: int | None) -> int:
    """The count ``threads`` means: itself, or torch's default (:func:`default_threads`) for ``None``."""
    return int(threads) if threads else default_threads()


def pin_torch_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` (``None``: torch's default, restored if something pinned
    another count before) and return the count now in effect."""
    import torch

    default_threads()  # remember torch's own count before the first pin changes it
    count = resolve_threads(threads)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


@contextmanager
def exact_cpu(threads: int | None, device: str = "cpu") -> Iterator[int]:
    """:func:`pin_torch_threads` plus, for a computation on the CPU (``device``), torch's deterministic kernels
    while the block runs (the flags are restored after it; the thread count stays pinned): the same inputs at the
    same count give the same bytes, however the threads were scheduled. Yields the count. (The kernels' NaN
    fill of new uninitialised tensors stays off: it costs time and changes no correct result.)"""
    import torch
    import torch.utils.deterministic as det

    count = pin_torch_threads(threads)
    if torch.device(device).type != "cpu":
        yield count
        return
    was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: an op without such a kernel still runs
    det.fill_uninitialized_memory = False
    try:
        yield count
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        det.fill_uninitialized_memory = was[2]
