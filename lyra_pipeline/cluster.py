"""GPU-aware scale-out of dataset generation on Dask.

``lyra run --gpus N`` starts a local Dask cluster with one worker per GPU (``CUDA_VISIBLE_DEVICES`` pinned to its
device, worker resource ``GPU=1``, one task at a time) beside ``--workers`` CPU workers. The flow submits its GPU
stages (video generation) with ``dask.annotate(resources={"GPU": 1})``, so they run only on GPU workers, one
per GPU, while the CPU stages (depth fallback, warping, masks) spread over every worker. On several machines,
start workers with ``dask worker SCHEDULER --resources GPU=1`` (one per GPU, each with its own
``CUDA_VISIBLE_DEVICES``) and pass ``--dask-address``; the same annotation applies.
"""

from __future__ import annotations

from typing import Any

from lyra_ops.errors import LyraConfigError

GPU_RESOURCE = {"GPU": 1}


def cuda_device_count() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpus(gpus: int) -> None:
    """Fail clearly (before anything is written) when the machine has fewer CUDA GPUs than asked for."""
    have = cuda_device_count()
    if gpus > have:
        raise LyraConfigError(f"--gpus {gpus}: this machine has {have} CUDA GPU(s) (torch.cuda.device_count()); run "
                              "without --gpus, or on a machine with GPUs, or use --dask-address with workers started "
                              "with --resources GPU=1")


def gpu_cluster_spec(gpus: int, cpu_workers: int) -> dict[str, Any]:
    """``distributed.SpecCluster`` arguments: ``gpus`` single-threaded GPU workers, each seeing one device as
    ``cuda:0`` and offering resource ``GPU=1``, and ``cpu_workers`` CPU workers that offer none."""
    workers: dict[str, Any] = {}
    for i in range(gpus):
        workers[f"gpu-{i}"] = {"cls": "distributed.Nanny", "options": {
            "nthreads": 1, "resources": dict(GPU_RESOURCE), "env": {"CUDA_VISIBLE_DEVICES": str(i)}}}
    for i in range(cpu_workers):
        workers[f"cpu-{i}"] = {"cls": "distributed.Nanny", "options": {
            "nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": ""}}}
    return {"workers": workers, "scheduler": {"cls": "distributed.Scheduler", "options": {"dashboard_address": None}}}


def check_scheduler(address: str, timeout_s: float = 3.0) -> None:
    """A Dask scheduler address that answers a TCP connect within ``timeout_s`` (before anything is written;
    ``distributed`` itself retries for over a minute and then fails with a traceback)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme not in ("tcp", "tls") or not parts.hostname or parts.port is None:
        raise LyraConfigError(f"--dask-address {address!r}: expected tcp://HOST:PORT of a running Dask scheduler")
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise LyraConfigError(f"--dask-address {address}: no Dask scheduler answers there within {timeout_s:.0f} s "
                              f"({exc.strerror or type(exc).__name__}); start one (`dask scheduler`) or drop the "
                              "option") from None
