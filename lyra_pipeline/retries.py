"""Prefect retry policy of the stage tasks: retry transient I/O failures, never deterministic ones.

A scene whose input is malformed fails the same way every time (``LyraError``: bad image, bad config, stale
store): retrying only delays the batch. Network hiccups, throttled object-store requests and timeouts
(``OSError`` other than permission errors) are retried twice with a short back-off.
"""

from __future__ import annotations

from lyra_ops.errors import LyraError
from lyra_pipeline.distributed import DistributedJobError


def is_transient(exc: BaseException | None) -> bool:
    """True for errors worth retrying: I/O and network failures, and a distributed job one of whose ranks was
    killed (not one that raised); not input/config/permission errors."""
    if isinstance(exc, DistributedJobError):
        return exc.retriable
    if exc is None or isinstance(exc, LyraError | PermissionError):
        return False
    return isinstance(exc, OSError | TimeoutError | ConnectionError)


def transient_only(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry the task run only when it failed with a transient error."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:  # noqa: BLE001 - the result could not be read: decide on that error
        exc = err
    return is_transient(exc if isinstance(exc, BaseException) else None)


STAGE_TASK_OPTIONS = {"retries": 2, "retry_delay_seconds": [1, 5], "retry_condition_fn": transient_only}
