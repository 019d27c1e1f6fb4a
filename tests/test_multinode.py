"""Two machines' worth of torchrun (issue 29, multi-node): two ``torchrun --nnodes 2 --rdzv-backend c10d`` agents
of one process each, started separately as two machines would start them and meeting at one c10d endpoint on a
free local port, train the smoke decoder to the weights one process gets with the same global batch. The same
through ``lyra train --nnodes 2 --rdzv-endpoint`` run twice side by side. A node that dies (its agent and worker
SIGKILLed together, as a lost machine) fails the other node's job in one line naming it, and a relaunch of both
resumes from the last checkpoint to the same weights.

Every process a test starts is ended when it finishes (agents in sessions of their own, workers by the pids they
record)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lyra_pipeline.distributed import DistributedJobError, run_torchrun, torchrun_command
from lyra_pipeline.runner import checkpoint_steps
from lyra_pipeline.storage import RunStore
from lyra_pipeline.training import build_train_config, plan_run, read_metrics, train_until
from tests.test_distributed import assert_same, overrides, weights

REPO = Path(__file__).resolve().parents[1]
NODE_HARNESS = str(REPO / "tests" / "node_harness.py")
# what the surviving node says: the lost node named, then gloo's sentence (which varies with where it noticed)
LOST = re.compile(r"lost node 1 \(host [^,]+, rank 1\): .*(Connection (closed|reset)|Broken pipe)")
# The CLI launches `-m lyra_pipeline.train_worker`: the same node-death hook, loaded into its workers through a
# sitecustomize module on their PYTHONPATH (acts only in a torchrun worker, RANK set, with the variable set).
SITECUSTOMIZE = '''
import os
if os.environ.get("RANK") is not None:
    if folder := os.environ.get("LYRA_TEST_PIDS"):
        open(os.path.join(folder, str(os.getpid())), "w").close()
    if fault := os.environ.get("LYRA_TEST_NODE_DIES"):
        import signal
        from lyra_pipeline import runner
        rank, step = (int(x) for x in fault.split(":"))
        if int(os.environ["RANK"]) == rank:
            _step = runner.train_step
            def _dying_step(recipe, state, *args, **kw):
                if state.step + 1 == step:  # the whole machine: `lyra train`, its torchrun agent, this worker
                    os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)
                    os.kill(os.getpid(), signal.SIGKILL)
                return _step(recipe, state, *args, **kw)
            runner.train_step = _dying_step
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nodes:
    """The processes of a test's nodes: each started in a session of its own; at the end every one still running
    is SIGKILLed with its group, and so is every worker that recorded its pid (torchrun starts workers in sessions
    of their own, which an agent killed by SIGKILL does not end)."""

    def __init__(self, tmp: Path) -> None:
        self.pids = tmp / "pids"
        self.pids.mkdir()
        self.procs: list[subprocess.Popen] = []

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                "LYRA_TEST_PIDS": str(self.pids), **extra}

    def start(self, cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def cleanup(self) -> list[int]:
        """End what is left; returns the worker pids that were still alive (none after a clean job)."""
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        left = []
        for f in self.pids.iterdir():
            pid = int(f.name)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"train_worker" in cmdline or b"node_harness" in cmdline:
                left.append(pid)
                os.kill(pid, signal.SIGKILL)
        return left


@pytest.fixture
def nodes(tmp_path):
    n = Nodes(tmp_path)
    yield n
    n.cleanup()


@pytest.fixture(scope="module")
def reference(smoke_store_template, tmp_path_factory):
    """The smoke decoder trained by one process (global batch 2, 10 steps, checkpoints at 5 and 10)."""
    url = str(shutil.copytree(smoke_store_template, tmp_path_factory.mktemp("mn") / "one"))
    run = plan_run(RunStore(url, create=False), build_train_config("smoke", overrides()))
    for end in (5, 10):
        train_until(url, run.name, end)
    return url, run.name


def node_command(url: str, run: str, port: int, node: int) -> list[str]:
    """What each machine runs: the same torchrun command but for its --node-rank (which c10d ignores: it assigns
    node ranks in the order the agents join)."""
    cmd = torchrun_command([NODE_HARNESS, "decoder", url, run], nproc=1, nnodes=2,
                           rdzv_endpoint=f"127.0.0.1:{port}", run_id=run, module=False)
    at = cmd.index("--max-restarts=0")
    return [*cmd[:at], f"--node-rank={node}", *cmd[at:]]


def planned_copy(src: str, dst: Path, run: str) -> str:
    url = str(shutil.copytree(src, dst, ignore=shutil.ignore_patterns("train")))
    assert plan_run(RunStore(url, create=False), build_train_config("smoke", overrides())).name == run
    return url


def written(url: str, run: str, step: int) -> dict[str, int]:
    """The files of a checkpoint and their mtimes (ns)."""
    folder = Path(url) / RunStore.checkpoint_rel(run, step)
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_two_torchrun_nodes_train_like_one_process(reference, nodes, tmp_path, smoke_store_template):
    one, run = reference
    url = planned_copy(str(smoke_store_template), tmp_path / "two", run)
    port = free_port()
    procs = [nodes.start(node_command(url, run, port, n), tmp_path / f"node{n}.log", nodes.env()) for n in (0, 1)]
    codes = [p.wait(timeout=300) for p in procs]
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    assert codes == [0, 0], logs
    assert checkpoint_steps(RunStore(url, create=False), run) == [5, 10]
    assert_same(weights(one, run, 10), weights(url, run, 10))
    assert_same(weights(one, run, 10, "optimizer.safetensors"), weights(url, run, 10, "optimizer.safetensors"))
    assert [r["step"] for r in read_metrics(RunStore(url), run).to_pylist()] == list(range(1, 11))
    assert sorted(int(f.name) for f in nodes.pids.iterdir()) and nodes.cleanup() == []  # both workers ended


def test_a_lost_node_fails_the_other_in_one_line_and_a_relaunch_resumes(reference, nodes, tmp_path,
                                                                        smoke_store_template):
    """The node of rank 1 dies (agent and worker SIGKILLed) before step 8: the other node's job fails at its next
    all-reduce, in one line naming the lost node; both nodes relaunched resume from step 5. (c10d gives node ranks
    in its own order, so which command is node 1 is found afterwards.)"""
    import threading

    one, run = reference
    url = planned_copy(str(smoke_store_template), tmp_path / "two", run)
    port = free_port()
    dies = nodes.env(LYRA_TEST_NODE_DIES="1:8")
    errors: dict[int, BaseException | None] = {}

    def node(n: int) -> None:
        try:
            run_torchrun(node_command(url, run, port, n), env=dies)
            errors[n] = None
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors[n] = exc

    threads = [threading.Thread(target=node, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(isinstance(e, DistributedJobError) for e in errors.values()), errors
    lines = sorted((str(e) for e in errors.values()), key=lambda m: "exited with code -9" not in m)
    # the dead machine's agent (SIGKILLed, no report of its own) and the survivor's one line
    assert lines[0].startswith("distributed training failed: torchrun exited with code -9"), lines
    line = lines[1]
    assert "\n" not in line and "Traceback" not in line
    # the survivor's rank names the lost node at its next all-reduce, unless the lost node served the c10d
    # rendezvous store: then the survivor's agent fails first, naming that endpoint
    if "rendezvous" in line:
        assert line == (f"distributed training failed: lost the node serving the rendezvous at 127.0.0.1:{port} "
                        "(torchrun's c10d store); relaunch every node to resume from the last checkpoint"), line
    else:
        assert line.startswith("distributed training failed: rank 0 failed: lost node 1 (host "), line
        assert LOST.search(line), line
    assert checkpoint_steps(RunStore(url, create=False), run) == [5]
    assert nodes.cleanup() == []  # the survivor's worker exited on its own; the dead node's was killed
    step5 = written(url, run, 5)
    # relaunched on both machines (a new rendezvous), the job resumes from step 5 to the uninterrupted weights
    port = free_port()
    procs = [nodes.start(node_command(url, run, port, n), tmp_path / f"again{n}.log", nodes.env()) for n in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0], (tmp_path / "again0.log").read_text()
    assert written(url, run, 5) == step5  # resumed from it: the step-5 checkpoint was not made again
    assert checkpoint_steps(RunStore(url, create=False), run) == [5, 10]
    assert_same(weights(one, run, 10), weights(url, run, 10))
    assert [r["step"] for r in read_metrics(RunStore(url), run).to_pylist()] == list(range(1, 11))


def lyra_train(nodes: Nodes, url: str, cfg: Path, port: int, log: Path, env: dict[str, str]) -> subprocess.Popen:
    return nodes.start([sys.executable, "-m", "lyra_pipeline.cli", "train", "--store", url, "--config", str(cfg),
                        "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}"], log, env)


@pytest.mark.slow
def test_lyra_train_on_two_nodes_side_by_side_and_a_lost_node(reference, nodes, tmp_path, smoke_store_template,
                                                               prefect_harness):
    """`lyra train --nnodes 2 --rdzv-endpoint` started twice (one per machine): the first pair loses the node of
    rank 1 before step 8; the other command fails with one error line naming it (exit 2); both again resume from
    step 5 and end with the one-process weights."""
    import yaml
    from prefect.settings import PREFECT_API_URL

    one, run = reference
    url = planned_copy(str(smoke_store_template), tmp_path / "two", run)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"preset": "smoke", **overrides()}))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    base = nodes.env(PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=f"{hook}{os.pathsep}{REPO}")
    port = free_port()
    first = [lyra_train(nodes, url, cfg, port, tmp_path / f"kill{n}.log", {**base, "LYRA_TEST_NODE_DIES": "1:8"})
             for n in (0, 1)]
    codes = [p.wait(timeout=300) for p in first]
    logs = [(tmp_path / f"kill{n}.log").read_text() for n in (0, 1)]
    # which command's node ranks 1 is the rendezvous's choice: that one was killed, the other failed in one line
    assert sorted(codes) == [-signal.SIGKILL, 2], (codes, logs)
    survivor = logs[codes.index(2)]
    errors = [ln for ln in survivor.splitlines() if ln.startswith("error:")]
    assert errors == [errors[0]] and "Traceback" not in survivor, survivor
    assert errors[0].startswith("error: distributed training failed: rank 0 failed: lost node 1 (host "), survivor
    assert LOST.search(errors[0]), survivor
    # the failed task's own console line (ConsoleFailureFilter keeps one per failed task run) says the same
    assert all("lost node 1 (host " in ln for ln in survivor.splitlines() if ln.strip()), survivor
    assert checkpoint_steps(RunStore(url, create=False), run) == [5]
    nodes.cleanup()
    port = free_port()
    again = [lyra_train(nodes, url, cfg, port, tmp_path / f"again{n}.log", base) for n in (0, 1)]
    codes = [p.wait(timeout=300) for p in again]
    logs = [(tmp_path / f"again{n}.log").read_text() for n in (0, 1)]
    assert codes == [0, 0], logs
    for log in logs:
        assert f"decoder {run}: 10 steps (5 computed now on 2 processes)" in log, log
    assert_same(weights(one, run, 10), weights(url, run, 10))
    assert nodes.cleanup() == []


def test_a_broken_connection_names_the_node_it_went_to():
    from lyra_pipeline.distributed import failure_from_output, lost_peer

    gloo = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.0.0.2]:4242. "
            "This is typically caused by a remote worker crashing.")
    two = [{"rank": 0, "node": 0, "host": "a"}, {"rank": 1, "node": 1, "host": "b"}]
    assert lost_peer(gloo, two, 0) == "lost node 1 (host b, rank 1): Connection closed by peer [10.0.0.2]:4242"
    four = [*two, {"rank": 2, "node": 2, "host": "c"}, {"rank": 3, "node": 2, "host": "c"}]
    assert lost_peer(gloo, four, 1).startswith("lost one of node 0 (host a, rank 0), node 2 (host c, ranks 2, 3): ")
    # torchrun's report on the surviving node: its own rank, whose last words name the lost node
    error = lost_peer(gloo, two, 0)
    lines = [f'LYRA_RANK_ERROR {{"rank": 0, "error": "{error}"}}', "Root Cause (first observed failure):",
             "  rank      : 0 (local_rank: 0)", "  exitcode  : 1 (pid: 5)"]
    assert failure_from_output(lines) == f"rank 0 failed: {error}"
