"""Clean Ctrl-C and SIGTERM: stop within seconds, record what was in flight as ``interrupted``, say one line.

A command that writes a store runs inside :func:`handling` (``lyra run``, ``evaluate``, ``train``, ``refine``,
``reconstruct``). On the first SIGINT / SIGTERM:

1. :data:`STOP` is set: stage workers stop at their next unit boundary (:func:`check`), so no new unit starts;
2. the command's work thread gets a short grace period to reach that boundary;
3. this process's manifest writes are frozen (a worker still inside a unit can no longer record anything), child
   processes (Dask workers, torchrun ranks, the ephemeral Prefect server) are terminated;
4. every ``running`` row this process's runs wrote becomes ``interrupted`` (pending for ``status``, redone by the
   next run; never ``failed``), the scene leases of those runs are released;
5. one line ``interrupted: N units done, M will resume on the next run`` (or the command's own), exit 130,
   without the interpreter's shutdown (whose executor and logging teardown printed tracebacks before).

Every file the store holds is written atomically (temp + rename, or one PUT), so stopping at any instant leaves
what a SIGKILL would: the next run resumes it exactly.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STOP = threading.Event()
LOCK = threading.RLock()  # held by every manifest write of this process and by the interrupt's own rewrite
RUN_IDS: set[str] = set()  # runs of this process that wrote manifest rows (their running rows get interrupted)
STORES: set[str] = set()  # stores those runs wrote
GRACE_S = 3.0
_frozen = False
_state: dict = {}


class Interrupted(Exception):  # noqa: N818 - reads as what happened
    """Raised at a unit boundary after Ctrl-C / SIGTERM: the unit was not started."""


def check() -> None:
    """Stop before the next unit once an interrupt was asked for."""
    if STOP.is_set():
        raise Interrupted("interrupted (Ctrl-C / SIGTERM)")


def stopping() -> bool:
    return STOP.is_set()


def register(store_url: str, run_id: str) -> None:
    """Note that ``run_id`` writes manifest rows in ``store_url`` from this process."""
    with LOCK:
        RUN_IDS.add(run_id)
        STORES.add(store_url)


def writes_allowed() -> bool:
    """False once the interrupt froze this process's manifest writes (call with :data:`LOCK` held)."""
    return not _frozen


@contextmanager
def handling(summary: Callable[[], str] | None = None) -> Iterator[Callable[[threading.Thread], None]]:
    """While inside, SIGINT and SIGTERM (to this main thread) stop the command as the module docstring says;
    the previous handlers come back after. ``summary``: the command's own line after ``interrupted: ``
    (default: units done and to resume). Yields a function that names the thread doing the work (given
    :data:`GRACE_S` to reach a unit boundary). Outside the main thread (embedded use) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda _: None
        return
    _state.update(summary=summary, work=None, started=time.time())
    previous = {sig: signal.signal(sig, _handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda thread: _state.__setitem__("work", thread)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _handle(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    global _frozen
    if STOP.is_set():  # a second Ctrl-C while finishing: finish now
        os._exit(130)
    STOP.set()
    work = _state.get("work")
    if work is not None and work.is_alive():
        work.join(GRACE_S)
    with LOCK:
        _frozen = True
    stopped = _stop_children()
    done, resumed = _mark_interrupted(stopped | {os.getpid()})
    summary = _state.get("summary")
    try:
        line = summary() if summary is not None else f"{done} units done, {resumed} will resume on the next run"
    except Exception:  # noqa: BLE001 - the summary is best effort; the store is already consistent
        line = f"{done} units done, {resumed} will resume on the next run"
    sys.stdout.flush()
    sys.stderr.write(f"\ninterrupted: {line}\n")
    sys.stderr.flush()
    os._exit(130)


def _stop_children(timeout_s: float = 3.0) -> set[int]:
    """Terminate this process's children (Dask workers, torchrun ranks, the ephemeral Prefect server); their
    pids."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return set()
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return set()
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
    return {c.pid for c in children}


def _mark_interrupted(pids: set[int]) -> tuple[int, int]:
    """Rewrite this process's runs' ``running`` rows as ``interrupted`` and release their leases; returns (units
    those runs finished, units now interrupted)."""
    from lyra_pipeline.store.runstore import RunStore

    done = interrupted = 0
    since = _state.get("started", 0.0) - 1.0
    for url in sorted(STORES):
        try:
            store = RunStore(url, create=False)
            n_done, n_int = store.mark_interrupted(RUN_IDS, since)
            done, interrupted = done + n_done, interrupted + n_int
            store.release_leases_of(RUN_IDS, pids)
        except Exception:  # noqa: BLE001 - the next run treats leftover running rows and stale leases anyway
            continue
    return done, interrupted
