"""Teacher fine-tuning: flow-matching math, the tiny teacher backend, the train-teacher flow, resume, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lyra_ops.errors import LyraConfigError, LyraInputError
from lyra_ops.gen3c import Conditioning, sample
from lyra_ops.teacher import (
    CONDITION_WIDTH,
    disoccluded,
    flow_match_noisy,
    flow_match_target,
    predicted_x0,
    psnr_from_sse,
    region_sse,
    sample_sigmas,
    shift_sigmas,
    teacher_condition,
)
from lyra_pipeline.backends.tiny_teacher import (
    SHIPPED_TEACHER,
    TinyTeacherGenerator,
    TinyUNetSpec,
    build_unet,
    inspect_teacher,
    make_scheduler,
    velocity,
    write_teacher_folder,
)
from lyra_pipeline.storage import RunStore
from lyra_pipeline.teacher_training import (
    EVAL_SCHEMA,
    TEACHER_METRICS,
    build_teacher_config,
    index_pairs,
    plan_teacher_run,
    train_teacher_until,
)
from tests.conftest import check_train_files_documented

REPO = Path(__file__).resolve().parents[1]


# --- pure math ----------------------------------------------------------------------------------------------


def test_flow_matching_interpolates_and_inverts():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
    xt = flow_match_noisy(x0, noise, sigma)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[3], noise[3])
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    v = flow_match_target(x0, noise)
    torch.testing.assert_close(predicted_x0(xt, v, sigma), x0, atol=1e-6, rtol=0)


def test_sigma_sampling_and_shift():
    u = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift_sigmas(u, 1.0), u)
    shifted = shift_sigmas(u, 3.0)
    assert torch.all(shifted[1:] > shifted[:-1]) and shifted[0] == 0 and shifted[-1] == 1
    assert torch.all(shifted[1:-1] > u[1:-1])  # shift > 1 moves mass to high noise
    s = sample_sigmas(1000, torch.Generator().manual_seed(1))
    assert s.min() >= 1e-3 and s.max() <= 1 and abs(float(s.median()) - 0.5) < 0.05
    assert torch.equal(s, sample_sigmas(1000, torch.Generator().manual_seed(1)))


def test_condition_channels_and_disocclusion():
    warped = torch.rand(3, 3, 4, 6) * 2 - 1
    mask = torch.rand(3, 1, 4, 6) > 0.5
    first = torch.rand(3, 4, 6)
    c = teacher_condition(warped, mask, first)
    assert c.shape == (3, CONDITION_WIDTH, 4, 6)
    assert torch.equal(c[:, :3][mask.expand(-1, 3, -1, -1)], warped[mask.expand(-1, 3, -1, -1)])
    assert torch.all(c[:, :3][~mask.expand(-1, 3, -1, -1)] == -1)
    assert torch.equal(c[:, 3:4], mask.float() * 2 - 1)
    torch.testing.assert_close(c[2, 4:], first * 2 - 1)
    holes = disoccluded(mask)
    assert not holes[0].any() and torch.equal(holes[1:], ~mask[1:])


def test_region_sse_against_a_loop():
    g = torch.Generator().manual_seed(2)
    pred, truth = torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 3, 4, 4, generator=g)
    region = torch.rand(2, 1, 4, 4, generator=g) > 0.5
    sse, n = region_sse(pred, truth, region)
    ref, cnt = 0.0, 0
    for t in range(2):
        for y in range(4):
            for x in range(4):
                if region[t, 0, y, x]:
                    ref += float(((pred[t, :, y, x].double() - truth[t, :, y, x].double()) ** 2).sum())
                    cnt += 3
    assert n == cnt and math.isclose(sse, ref, rel_tol=1e-9)
    assert psnr_from_sse(0.0, 5) == math.inf and math.isnan(psnr_from_sse(0.0, 0))
    assert math.isclose(psnr_from_sse(0.01 * 7, 7), 20.0)


# --- the backend ----------------------------------------------------------------------------------------------


def test_unet_runs_at_any_size_and_scheduler_convention():
    model = build_unet(TinyUNetSpec(channels=(8, 16), norm_groups=4, patch=2)).eval()
    x, cond = torch.randn(2, 3, 18, 30), torch.randn(2, CONDITION_WIDTH, 18, 30)
    with torch.no_grad():
        assert velocity(model, x, cond, torch.tensor([500.0, 10.0])).shape == (2, 3, 18, 30)
    # With the exact velocity (x - x0) / sigma, the Euler sampler over diffusers' scheduler lands on x0: this
    # pins timestep = 1000 sigma, the convention the training objective uses.
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1

    def exact(xin, timestep, _):
        return (xin[:, :3] - x0) / (timestep / 1000.0).view(-1, 1, 1, 1)

    out = sample(exact, make_scheduler(3.0), torch.randn(2, 3, 8, 8),
                 Conditioning(base=None, warp=torch.zeros(2, 1, 8, 8), text=torch.zeros(0), negative_text=None),
                 steps=5, guidance=0.0)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_teacher_folder_validation(tmp_path):
    with pytest.raises(LyraConfigError, match="not a directory"):
        inspect_teacher(tmp_path / "missing")
    folder = write_teacher_folder(build_unet(TinyUNetSpec(channels=(8, 16), norm_groups=4, patch=2)),
                                  tmp_path / "t", {"sampling_steps": 2, "shift": 1.0})
    assert inspect_teacher(folder)["sampling_steps"] == 2
    bad = Path(shutil.copytree(folder, tmp_path / "corrupt"))
    data = (bad / "diffusion_pytorch_model.safetensors").read_bytes()
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(data[:-100])
    with pytest.raises(LyraConfigError, match="truncated"):
        inspect_teacher(bad)
    wrong = Path(shutil.copytree(folder, tmp_path / "wrong"))
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "in_channels": 11}))
    with pytest.raises(LyraConfigError, match="in_channels=11"):
        inspect_teacher(wrong)
    (wrong / "teacher.json").write_text("{not json")
    with pytest.raises(LyraConfigError, match="teacher.json: corrupt"):
        inspect_teacher(wrong)


def test_shipped_teacher_is_small_documented_and_generates():
    meta = inspect_teacher(SHIPPED_TEACHER)
    size = sum(f.stat().st_size for f in SHIPPED_TEACHER.iterdir())
    assert size < 12 * 2**20, f"shipped teacher is {size / 2**20:.1f} MiB"
    assert meta["trained"]["command"].startswith("lyra train-teacher") and "held_out" in meta
    from lyra_ops.cameras import Cameras

    cams = Cameras(torch.eye(4).expand(3, 4, 4).clone(), torch.tensor([[40.0, 0, 32], [0, 40.0, 24], [0, 0, 1]])
                   .expand(3, 3, 3).clone(), 48, 64)
    first = torch.rand(3, 48, 64)
    warped = first[None].expand(3, -1, -1, -1) * 2 - 1
    mask = torch.ones(3, 1, 48, 64, dtype=torch.bool)
    mask[1:, :, 10:20, 10:30] = False
    gen = TinyTeacherGenerator(steps=2)
    a = gen.generate(first, "", cams, warped, mask, seed=3)
    b = gen.generate(first, "", cams, warped, mask, seed=3)
    assert a.shape == (3, 3, 48, 64) and torch.equal(a, b) and torch.equal(a[0], first)
    assert a.min() >= 0 and a.max() <= 1


# --- training on a store --------------------------------------------------------------------------------------


def test_training_resumes_exactly_and_rerun_does_nothing(smoke_store, tmp_path):
    url = str(smoke_store)
    cfg = build_teacher_config("smoke")
    run = plan_teacher_run(RunStore(url, create=False), cfg, "smoke")
    assert set(run.train_scenes).isdisjoint(run.val_scenes) and len(run.val_scenes) == 1
    train_teacher_until(url, run.name, 3)
    resumed = train_teacher_until(url, run.name, 6)
    assert resumed["from"] == 3 and resumed["computed"] == 3
    assert train_teacher_until(url, run.name, 6)["computed"] == 0
    other = Path(shutil.copytree(smoke_store, tmp_path / "other"))
    shutil.rmtree(other / "train")
    run2 = plan_teacher_run(RunStore(str(other), create=False), cfg, "smoke")
    assert run2.name == run.name
    straight = train_teacher_until(str(other), run.name, 6)
    assert straight["model_sha256"] == resumed["model_sha256"]  # bit-identical weights


def test_training_needs_oracle_pairs(smoke_store):
    store = RunStore(str(smoke_store), create=False)
    scene = sorted(store.scene_ids())[0]
    for name in store.scene_group(scene)["trajectories"]:
        store.scene_group(scene)[f"trajectories/{name}/teacher/rgb"].attrs["generator"] = "warp_only"
    with pytest.raises(LyraInputError, match="generator.backend 'oracle'"):
        index_pairs(store)


def test_flow_trains_evaluates_exports_and_documents(smoke_store, tmp_path, prefect_harness):
    from flows.train_teacher import train_teacher

    out = tmp_path / "exported"
    summary = train_teacher(store=str(smoke_store), preset="smoke", export_to=str(out))
    assert summary["steps_computed"] == 6 and summary["step"] == 6
    for k in ("teacher_psnr_disoccluded", "warp_only_psnr_disoccluded", "teacher_psnr_all"):
        assert math.isfinite(summary[k])
    assert summary["oracle_psnr_all"] == math.inf
    meta = inspect_teacher(out)
    assert meta["trained"]["run"] == summary["run"] and meta["held_out"]["teacher_psnr_all"] > 0
    again = train_teacher(store=str(smoke_store), preset="smoke")
    assert again["steps_computed"] == 0 and again["teacher_psnr_all"] == summary["teacher_psnr_all"]
    # storage_layout.md documents exactly the files a teacher run writes
    check_train_files_documented(smoke_store, "<teacher>", r"teacher-[0-9a-f]{12}")
    doc = (REPO / "storage_layout.md").read_text()
    for col in EVAL_SCHEMA.names + TEACHER_METRICS.names:
        assert f"`{col}`" in doc, f"column {col} not documented"


def test_sdg_with_the_tiny_teacher_is_deterministic_and_resumable(tmp_path, prefect_harness):
    from flows.generate_dataset import generate_dataset
    from lyra_pipeline.config import build_config

    over = {"scenes": {"num_scenes": 1}, "trajectories": {"names": ["left", "zoom_in"]},
            "generator": {"backend": "tiny", "steps": 2}}
    first = generate_dataset(store=str(tmp_path / "a"), preset="smoke", overrides=over)
    again = generate_dataset(store=str(tmp_path / "a"), preset="smoke", overrides=over)
    assert again["computed"] == 0
    generate_dataset(store=str(tmp_path / "b"), preset="smoke", overrides=over)
    a, b = RunStore(str(tmp_path / "a"), create=False), RunStore(str(tmp_path / "b"), create=False)
    sid = a.scene_ids()[0]
    fa = a.read_array(sid, "trajectories/left/teacher/rgb")
    assert (fa == b.read_array(sid, "trajectories/left/teacher/rgb")).all()
    assert a.scene_group(sid)["trajectories/left/teacher/rgb"].attrs["generator"] == "tiny"
    assert first["computed"] > 0
    build_config("smoke", over)  # the same config validates outside the flow


def test_wan_teacher_fine_tunes_the_conditioning_with_lora(smoke_store, tmp_path):
    from lyra_pipeline.backends.diffusers_video import DiffusersVideoGenerator
    from lyra_pipeline.backends.tiny import make_tiny_wan
    from lyra_pipeline.teacher_training import evaluate_teacher, export_teacher, load_teacher_trainer

    wan = make_tiny_wan(tmp_path / "wan")
    url = str(smoke_store)
    over = {"model": "diffusers", "diffusers": {"model_path": str(wan), "lora_rank": 2}, "steps": 2, "batch": 1,
            "sampling_steps": 2, "checkpoint_every": 1, "lr": 1e-2, "warmup_steps": 0}
    cfg = build_teacher_config("smoke", over)
    store = RunStore(url, create=False)
    run = plan_teacher_run(store, cfg, "smoke")
    first = train_teacher_until(url, run.name, 1)
    second = train_teacher_until(url, run.name, 2)
    assert first["computed"] == 1 and second["from"] == 1 and math.isfinite(second["loss_last"])
    trainer = load_teacher_trainer(store, run, 2)
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora" in n for n in trained) and any(n.startswith("patch_embedding") for n in trained)
    weight = trainer.model.patch_embedding.weight.detach()
    assert float(weight[:, 16:].abs().max()) > 0  # the zero-initialised warp/mask channels learned something
    metrics = evaluate_teacher(url, run.name, 2)
    assert math.isfinite(metrics["teacher_psnr_all"]) and metrics["oracle_psnr_all"] == math.inf
    folder = tmp_path / "conditioned"
    export_teacher(url, run.name, 2, metrics, folder)
    gen = DiffusersVideoGenerator(str(wan), conditioned_path=str(folder), steps=2)
    exported = gen.pipeline().transformer
    torch.testing.assert_close(exported.patch_embedding.weight, weight, rtol=0, atol=0)
    assert not any("lora" in n for n, _ in exported.named_parameters())  # merged into the weights on export
    base = DiffusersVideoGenerator(str(wan), steps=2).pipeline().transformer
    q = "blocks.0.attn1.to_q.weight"
    assert not torch.equal(exported.get_parameter(q), base.get_parameter(q))  # ...and they changed them
    assert gen.generate(*_video_inputs(store), seed=0).shape == (9, 3, 96, 160)


def _video_inputs(store: RunStore):
    from lyra_pipeline.teacher_training import PairCache, view_inputs

    scene = sorted(store.scene_ids())[0]
    view = PairCache(store).get(scene, "left")
    _, warped, mask, first = view_inputs(view)
    return first, view.prompt, view.cameras, warped, mask


def test_teacher_training_refuses_cogvideox(smoke_store, tmp_path):
    from lyra_pipeline.backends.tiny import make_tiny_cogvideox

    cog = make_tiny_cogvideox(tmp_path / "cog")
    cfg = build_teacher_config("smoke", {"model": "diffusers", "diffusers": {"model_path": str(cog)}})
    with pytest.raises(LyraConfigError, match="supports Wan"):
        plan_teacher_run(RunStore(str(smoke_store), create=False), cfg)
