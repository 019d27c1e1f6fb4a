"""Data-parallel training under torchrun (gloo on CPU): the same weights at any world size, rank 0 alone writes,
a killed rank fails the job with its error, and a relaunch at another world size resumes from the checkpoint."""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load

from lyra_ops.errors import LyraConfigError
from lyra_pipeline.distributed import (
    DistributedJobError,
    failure_from_output,
    killed_rank,
    lost_rendezvous,
    run_torchrun,
    torchrun_command,
)
from lyra_pipeline.runner import check_world_size, checkpoint_steps
from lyra_pipeline.storage import RunStore
from lyra_pipeline.teacher_training import build_teacher_config, plan_teacher_run, train_teacher_until
from lyra_pipeline.training import build_train_config, plan_run, read_metrics, train_until

REPO = Path(__file__).resolve().parents[1]
HARNESS = str(REPO / "tests" / "dist_harness.py")
# Float tolerance of "the same weights": DDP sums two ranks' gradients where one process accumulates them; each
# is the same two float32 halves added once, so on this machine the weights come out bit-identical (measured max
# |difference| 0.0 after 10 steps); 1e-6 leaves room for another gloo summation order.
ATOL = 1e-6


def overrides(steps: int = 10, every: int = 5, batch: int = 2) -> dict:
    return {"stages": [{"name": "views_1", "steps": steps, "targets": 2}], "checkpoint_every": every, "batch": batch,
            "torch_threads": 1, "optim": {"lr": 1e-3, "warmup_steps": 2}}


def copy_store(src: Path, dst: Path) -> str:
    return str(shutil.copytree(src, dst))


def weights(url: str, run: str, step: int, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return st_load(RunStore(url, create=False).read_file(RunStore.checkpoint_rel(run, step, name)))


def launch(url: str, run: str, nproc: int, *, kind: str = "decoder", env: dict | None = None, harness: bool = True,
           extra: tuple[str, ...] = ()):
    target = [HARNESS, kind, url, run, *extra] if harness else ["lyra_pipeline.train_worker", kind, url, run, *extra]
    cmd = torchrun_command(target, nproc=nproc, module=not harness)
    return run_torchrun(cmd, env={"PYTHONPATH": str(REPO), **(env or {})})


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = ATOL) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_two_ranks_train_like_one_and_only_rank_0_writes(smoke_store, tmp_path):
    config = build_train_config("smoke", overrides())
    one = copy_store(smoke_store, tmp_path / "one")
    two = copy_store(smoke_store, tmp_path / "two")
    run = plan_run(RunStore(one, create=False), config)
    assert plan_run(RunStore(two, create=False), config).name == run.name
    for end in (5, 10):
        train_until(one, run.name, end)
    launch(two, run.name, 2, env={"LYRA_TEST_WRITES": str(tmp_path / "writes")})
    # same weights, optimizer moments and sampling streams (the checkpoint holds both ranks' streams)
    assert_same(weights(one, run.name, 10), weights(two, run.name, 10))
    opt1 = weights(one, run.name, 10, "optimizer.safetensors")
    opt2 = weights(two, run.name, 10, "optimizer.safetensors")
    assert {"rng/sampler", "rng/sampler/1"} <= opt1.keys()
    assert_same(opt1, opt2)
    # metrics: one row per step, averaged over the global batch (equal to the one-process run's)
    m1, m2 = read_metrics(RunStore(one), run.name).to_pylist(), read_metrics(RunStore(two), run.name).to_pylist()
    assert [r["step"] for r in m2] == list(range(1, 11))
    for r1, r2 in zip(m1, m2, strict=True):
        assert math.isclose(r1["total"], r2["total"], rel_tol=1e-6) and r1["views"] == r2["views"]
    # rank 0 alone wrote, and wrote no file twice
    written = (tmp_path / "writes.0").read_text().split()
    assert not (tmp_path / "writes.1").exists()
    assert len(written) == len(set(written)) and any(w.endswith("state.json") for w in written)


def test_killed_rank_fails_the_job_and_another_world_size_resumes(smoke_store, tmp_path):
    config = build_train_config("smoke", overrides())
    straight = copy_store(smoke_store, tmp_path / "straight")
    url = copy_store(smoke_store, tmp_path / "killed")
    run = plan_run(RunStore(straight, create=False), config)
    plan_run(RunStore(url, create=False), config)
    for end in (5, 10):
        train_until(straight, run.name, end)
    # rank 1 is SIGKILLed before step 8: the job fails naming it; retriable (it reported no error of its own)
    with pytest.raises(DistributedJobError, match=r"rank 1 failed: .*(SIGKILL|Signal 9)") as err:
        launch(url, run.name, 2, env={"LYRA_TEST_FAULT": "1:8:kill"})
    assert err.value.retriable
    assert killed_rank(str(err.value)) == "rank 1 was killed (SIGKILL)"  # the line `lyra train` prints
    assert checkpoint_steps(RunStore(url, create=False), run.name) == [5]
    # relaunched with one process, it resumes from step 5 and ends where the uninterrupted run did
    launch(url, run.name, 1, harness=False)
    assert checkpoint_steps(RunStore(url, create=False), run.name)[-1] == 10
    assert_same(weights(url, run.name, 10), weights(straight, run.name, 10))
    assert [r["step"] for r in read_metrics(RunStore(url), run.name).to_pylist()] == list(range(1, 11))
    # a rank that raises: its own message, not retried
    raised = copy_store(smoke_store, tmp_path / "raised")
    plan_run(RunStore(raised, create=False), config)
    with pytest.raises(DistributedJobError, match="rank 0 failed: injected failure before step 2") as err:
        launch(raised, run.name, 2, env={"LYRA_TEST_FAULT": "0:2:raise"})
    assert not err.value.retriable
    assert killed_rank(str(err.value)) is None


def test_cli_train_says_which_rank_was_killed_and_where_the_retry_resumed(smoke_store, tmp_path, monkeypatch,
                                                                           prefect_harness):
    """`lyra train --nproc 2` whose job loses rank 1 to SIGKILL after the step-2 checkpoint: Prefect retries the
    task, the retry resumes from step 2, and the command says so in one line (exit 0). The job is played in this
    process (torchrun's failure as the test above gets it from a real kill); the retry is Prefect's."""
    import yaml
    from typer.testing import CliRunner

    import flows.distill_decoder
    import tasks.distributed
    from lyra_pipeline.cli import app

    over = overrides(4, 2)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"preset": "smoke", **over}))
    run = plan_run(RunStore(smoke_store, create=False), build_train_config("smoke", over))
    launches = []

    def job(cmd, *, on_line=lambda line: None, env=None):
        launches.append(cmd)
        url, name = cmd[-4], cmd[-3]  # ... lyra_pipeline.train_worker decoder STORE RUN --parallel ddp
        assert name == run.name
        if len(launches) == 1:
            train_until(url, name, 2)
            raise DistributedJobError("distributed training failed: rank 1 failed: Signal 9 (SIGKILL) received by "
                                      "PID 4242", retriable=True)
        train_until(url, name, 4)
        return []

    monkeypatch.setattr(tasks.distributed, "run_torchrun", job)
    monkeypatch.setattr(flows.distill_decoder, "train_distributed",  # its retries, without the 5 s wait
                        tasks.distributed.train_distributed.with_options(retry_delay_seconds=0))
    res = CliRunner().invoke(app, ["train", "--store", str(smoke_store), "--config", str(cfg), "--nproc", "2"])
    assert res.exit_code == 0, res.output
    assert len(launches) == 2  # Prefect retried the job once
    lines = [ln for ln in res.output.splitlines() if "was killed" in ln]
    assert lines == ["rank 1 was killed (SIGKILL); resumed from step 2"], res.output
    assert "4 steps (4 computed now on 2 processes)" in res.output  # both attempts' steps


@pytest.mark.slow
def test_teacher_two_ranks_train_like_one(smoke_store, tmp_path):
    config = build_teacher_config("smoke", {"streams": 2, "batch": 2, "steps": 4, "checkpoint_every": 2,
                                            "torch_threads": 1})
    one = copy_store(smoke_store, tmp_path / "one")
    two = copy_store(smoke_store, tmp_path / "two")
    run = plan_teacher_run(RunStore(one, create=False), config, "smoke")
    plan_teacher_run(RunStore(two, create=False), config, "smoke")
    for end in (2, 4):
        train_teacher_until(one, run.name, end)
    launch(two, run.name, 2, kind="teacher", harness=False)
    # one process runs both streams' crops through one batched convolution, two ranks one crop each: the sums run
    # in another order (measured max |difference| 2.0e-6 after 4 steps at lr 1e-3)
    assert_same(weights(one, run.name, 4), weights(two, run.name, 4), atol=1e-5)


def test_world_size_is_checked_before_launch():
    assert check_world_size(2, 1, 4) == 2
    with pytest.raises(LyraConfigError, match="3 processes but train.batch = 2"):
        check_world_size(3, 1, 2)
    with pytest.raises(LyraConfigError, match="--rdzv-endpoint"):
        torchrun_command(["x"], nproc=2, nnodes=2, rdzv_endpoint=None)
    cmd = torchrun_command(["lyra_pipeline.train_worker"], nproc=2, nnodes=2, rdzv_endpoint="node0:29500")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--rdzv-endpoint=node0:29500" in cmd


def test_failure_report_parsing():
    torchrun_report = """
Root Cause (first observed failure):
[0]:
  time      : 2026-12-04_17:00:00
  host      : box
  rank      : 3 (local_rank: 1)
  exitcode  : -9 (pid: 123)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 123
"""
    assert failure_from_output(torchrun_report.splitlines()) == "rank 3 failed: Signal 9 (SIGKILL) received by PID 123"
    ours = ['LYRA_RANK_ERROR {"rank": 1, "error": "bad data"}', *torchrun_report.splitlines()]
    assert failure_from_output(ours) == "rank 3 failed: Signal 9 (SIGKILL) received by PID 123"  # root cause wins
    ours = ['LYRA_RANK_ERROR {"rank": 3, "error": "bad data"}', *torchrun_report.splitlines()]
    assert failure_from_output(ours) == "rank 3 failed: bad data"
    assert failure_from_output(ours[:1]) == "rank 3 failed: bad data"
    assert failure_from_output(["nothing to see"]) is None


def test_a_lost_rendezvous_host_is_one_line_naming_its_endpoint():
    """A node whose agent lost the c10d store (the node serving it died) fails before any rank reports: one line
    naming the endpoint (seen in a two-node run whose lost node happened to serve the store)."""
    cmd = torchrun_command(["x"], nproc=1, nnodes=2, rdzv_endpoint="10.0.0.5:29400")
    lines = ['    base64_state: bytes = self._call_store("get", self._key)',
             '  File ".../c10d_rendezvous_backend.py", line 116, in _call_store',
             "    raise RendezvousConnectionError(",
             "torch.distributed.elastic.rendezvous.api.RendezvousConnectionError: The connection to the C10d store "
             "has failed. See inner exception for details."]
    assert lost_rendezvous(lines, cmd) == ("lost the node serving the rendezvous at 10.0.0.5:29400 (torchrun's c10d "
                                           "store); relaunch every node to resume from the last checkpoint")
    assert lost_rendezvous(["ValueError: bad"], cmd) is None
    assert failure_from_output(lines) is None  # so run_torchrun reports it (retriable) instead of the last lines


def test_flow_runs_the_job_as_one_task_and_rerun_does_nothing(smoke_store, prefect_harness):
    from flows.distill_decoder import distill_decoder

    over = overrides(4, 2)
    summary = distill_decoder(store=str(smoke_store), preset="smoke", overrides=over, nproc=2)
    assert summary["world_size"] == 2 and summary["steps_computed"] == 4 and summary["step"] == 4
    assert math.isfinite(summary["psnr_gt"])
    again = distill_decoder(store=str(smoke_store), preset="smoke", overrides=over, nproc=2)
    assert again["steps_computed"] == 0 and again["psnr_gt"] == summary["psnr_gt"]
    with pytest.raises(LyraConfigError, match="every rank needs at least one sample"):
        distill_decoder(store=str(smoke_store), preset="smoke", overrides=over, nproc=3)


def test_gpu_generation_fails_clearly_without_gpus(tmp_path):
    import subprocess

    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-m", "lyra_pipeline.cli", "run", "--preset", "smoke", "--gpus", "2",
                           "--store", str(store)], capture_output=True, text=True, env={**os.environ,
                           "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert proc.returncode != 0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "--gpus 2" in lines[0] and "GPU" in lines[0], lines
    assert not store.exists()


def test_cli_rejects_bad_world_sizes_in_one_line(smoke_store):
    import subprocess

    for args, expected in ((["--nproc", "3", "--batch", "2"], "3 processes but train.batch = 2"),
                           (["--nproc", "2", "--nnodes", "2"], "--rdzv-endpoint")):
        proc = subprocess.run([sys.executable, "-m", "lyra_pipeline.cli", "train", "--store", str(smoke_store),
                               "--preset", "smoke", *args], capture_output=True, text=True, timeout=300)
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        assert proc.returncode != 0 and len(lines) == 1 and expected in lines[0], lines
    assert not (smoke_store / "train").exists()


GPU_PLACEMENT = """
import os, dask
from distributed import SpecCluster, Client, get_worker
from lyra_pipeline.cluster import GPU_RESOURCE, gpu_cluster_spec
def where():
    return get_worker().name, os.environ.get("CUDA_VISIBLE_DEVICES")
if __name__ == "__main__":
    with SpecCluster(**gpu_cluster_spec(2, 1), silence_logs=40) as cluster, Client(cluster) as client:
        with dask.annotate(resources=GPU_RESOURCE):
            gpu = client.gather([client.submit(where, pure=False) for _ in range(8)])
        print(sorted(set(gpu)))
"""


def test_gpu_stages_run_only_on_gpu_workers_pinned_to_their_device(tmp_path):
    """The cluster `lyra run --gpus 2` starts: tasks annotated GPU=1 land on the two GPU workers, each seeing only
    its own device (CUDA_VISIBLE_DEVICES), never on the CPU worker."""
    import ast
    import subprocess

    script = tmp_path / "placement.py"
    script.write_text(GPU_PLACEMENT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    placed = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert {name for name, _ in placed} <= {"gpu-0", "gpu-1"} and placed
    assert all(dev == name[-1] for name, dev in placed)


@pytest.mark.slow
def test_wan_teacher_two_ranks_train_like_one(smoke_store, tmp_path):
    """The diffusers teacher (tiny random Wan, LoRA + widened patch embedding) under DDP."""
    from lyra_pipeline.backends.tiny import make_tiny_wan

    wan = make_tiny_wan(tmp_path / "wan")
    over = {"model": "diffusers", "diffusers": {"model_path": str(wan), "lora_rank": 2}, "steps": 2, "batch": 2,
            "streams": 2, "sampling_steps": 2, "checkpoint_every": 1, "lr": 1e-2, "warmup_steps": 0,
            "torch_threads": 1}
    config = build_teacher_config("smoke", over)
    one = copy_store(smoke_store, tmp_path / "one")
    two = copy_store(smoke_store, tmp_path / "two")
    run = plan_teacher_run(RunStore(one, create=False), config, "smoke")
    plan_teacher_run(RunStore(two, create=False), config, "smoke")
    for end in (1, 2):
        train_teacher_until(one, run.name, end)
    launch(two, run.name, 2, kind="teacher", harness=False)
    assert_same(weights(one, run.name, 2), weights(two, run.name, 2), atol=1e-5)


@pytest.mark.slow
def test_wan_teacher_fsdp_trains_like_one_process_and_resumes(smoke_store, tmp_path):
    """FSDP2 (parameters, gradients and AdamW moments sharded over 2 ranks) for the diffusers teacher: the same
    weights as one process, checkpoints gathered to rank 0 in the usual format, resumed by one process."""
    from lyra_pipeline.backends.tiny import make_tiny_wan

    wan = make_tiny_wan(tmp_path / "wan")
    over = {"model": "diffusers", "diffusers": {"model_path": str(wan), "lora_rank": 2}, "steps": 3, "batch": 2,
            "streams": 2, "sampling_steps": 2, "checkpoint_every": 1, "lr": 1e-2, "warmup_steps": 0,
            "torch_threads": 1}
    one = copy_store(smoke_store, tmp_path / "one")
    two = copy_store(smoke_store, tmp_path / "two")
    config = build_teacher_config("smoke", over)
    run = plan_teacher_run(RunStore(one, create=False), config, "smoke")
    plan_teacher_run(RunStore(two, create=False), config, "smoke")
    for end in (1, 2, 3):
        train_teacher_until(one, run.name, end)
    env = {"LYRA_TEST_FAULT": "0:3:raise"}  # two sharded chunks, then a failure before step 3
    with pytest.raises(DistributedJobError, match="injected failure"):
        launch(two, run.name, 2, kind="teacher", env=env, extra=("--parallel", "fsdp"))
    assert checkpoint_steps(RunStore(two, create=False), run.name)[-1] == 2
    assert_same(weights(one, run.name, 2), weights(two, run.name, 2), atol=1e-5)
    assert_same(weights(one, run.name, 2, "optimizer.safetensors"), weights(two, run.name, 2, "optimizer.safetensors"),
                atol=1e-5)
    train_teacher_until(two, run.name, 3)  # one process resumes the sharded job's checkpoint
    assert_same(weights(one, run.name, 3), weights(two, run.name, 3), atol=1e-5)


def test_a_peer_error_beats_the_connection_errors_it_causes():
    lines = ['LYRA_RANK_ERROR {"rank": 0, "error": "[gloo/pair.cc:545] Read error: Connection reset by peer"}',
             'LYRA_RANK_ERROR {"rank": 1, "error": "injected failure"}',
             "Root Cause (first observed failure):", "  rank      : 0 (local_rank: 0)", "  exitcode  : 1 (pid: 5)"]
    assert failure_from_output(lines) == "rank 1 failed: injected failure"
