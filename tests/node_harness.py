"""A torchrun target for tests/test_multinode.py: ``lyra_pipeline.train_worker`` as one node of a job.

- ``LYRA_TEST_PIDS=DIR``: each worker writes its pid to ``DIR/<pid>`` (the test ends any left running).
- ``LYRA_TEST_NODE_DIES=RANK:STEP``: just before step STEP, the node of that rank dies the way a machine does:
  its torchrun agent and the worker are SIGKILLed together (no error report, no clean exit).
"""

import os
import signal
import sys

from lyra_pipeline import runner, train_worker

if folder := os.environ.get("LYRA_TEST_PIDS"):
    with open(os.path.join(folder, str(os.getpid())), "w") as f:
        f.write(os.environ.get("RANK", ""))

if fault := os.environ.get("LYRA_TEST_NODE_DIES"):
    rank, step = (int(x) for x in fault.split(":"))
    if int(os.environ["RANK"]) == rank:
        _step = runner.train_step

        def _dying_step(recipe, state, *args, **kw):
            if state.step + 1 == step:
                os.kill(os.getppid(), signal.SIGKILL)  # the node's torchrun agent
                os.kill(os.getpid(), signal.SIGKILL)
            return _step(recipe, state, *args, **kw)

        runner.train_step = _dying_step

sys.exit(train_worker.main())
