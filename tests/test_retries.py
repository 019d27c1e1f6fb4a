"""Stage tasks retry transient I/O errors and never deterministic input errors."""

from __future__ import annotations

import pytest
from prefect import flow, task

from lyra_ops.errors import LyraInputError
from lyra_pipeline.retries import STAGE_TASK_OPTIONS, is_transient


def test_is_transient():
    assert is_transient(OSError("connection reset")) and is_transient(TimeoutError())
    assert is_transient(ConnectionError()) and not is_transient(PermissionError())
    assert not is_transient(LyraInputError("bad image")) and not is_transient(ValueError()) and not is_transient(None)
    # a distributed job: retried when a rank was killed, not when a rank raised
    from lyra_pipeline.distributed import DistributedJobError

    assert is_transient(DistributedJobError("rank 1 failed: Signal 9", retriable=True))
    assert not is_transient(DistributedJobError("rank 0 failed: bad data"))


def test_prefect_retries_transient_errors_only(prefect_harness):
    calls = {"io": 0, "input": 0}
    options = {**STAGE_TASK_OPTIONS, "retry_delay_seconds": 0}

    @task(**options)
    def flaky() -> str:
        calls["io"] += 1
        if calls["io"] < 3:
            raise OSError("throttled")
        return "ok"

    @task(**options)
    def bad_input() -> None:
        calls["input"] += 1
        raise LyraInputError("image.png: not an image")

    @flow
    def both() -> str:
        out = flaky()
        try:
            bad_input()
        except LyraInputError:
            pass
        return out

    assert both() == "ok"
    assert calls == {"io": 3, "input": 1}  # two retries for I/O, none for a deterministic error
    with pytest.raises(LyraInputError):
        flow(lambda: bad_input())()
