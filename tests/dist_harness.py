"""A torchrun target for tests/test_distributed.py: ``lyra_pipeline.train_worker`` with two test hooks.

- ``LYRA_TEST_WRITES=PREFIX``: every file a rank writes to the store is logged to ``PREFIX.<rank>``.
- ``LYRA_TEST_FAULT=RANK:STEP:kill|raise``: that rank SIGKILLs itself (or raises) just before step STEP.
"""

import os
import signal
import sys

from lyra_pipeline import runner, train_worker
from lyra_pipeline.storage import RunStore

RANK = int(os.environ["RANK"])

if prefix := os.environ.get("LYRA_TEST_WRITES"):
    _write = RunStore._write_bytes

    def _logged_write(self, rel, data, **kw):
        with open(f"{prefix}.{RANK}", "a") as f:
            f.write(rel + "\n")
        return _write(self, rel, data, **kw)

    RunStore._write_bytes = _logged_write

if fault := os.environ.get("LYRA_TEST_FAULT"):
    rank, step, how = fault.split(":")
    if int(rank) == RANK:
        _step = runner.train_step

        def _faulty_step(recipe, state, *args, **kw):
            if state.step + 1 == int(step):
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected failure before step {step}")
            return _step(recipe, state, *args, **kw)

        runner.train_step = _faulty_step

sys.exit(train_worker.main())
