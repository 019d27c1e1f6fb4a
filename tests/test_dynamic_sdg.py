"""The dynamic SDG through the generate-dataset flow (preset dynamic-smoke): moving objects, a moving input camera,
time-synchronised warping, flipped paths stored consistently, every array documented, idempotent, resumable."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lyra_ops.cameras import Cameras
from lyra_ops.errors import LyraConfigError
from lyra_ops.warp import forward_warp
from lyra_pipeline.config import build_config
from lyra_pipeline.planning import dynamic_world, scene_records
from lyra_pipeline.storage import RunStore

REPO = Path(__file__).resolve().parents[1]
ONE = {"scenes": {"num_scenes": 1}}


@pytest.fixture(scope="module")
def dynamic_store(tmp_path_factory, prefect_harness) -> Path:
    from flows.generate_dataset import generate_dataset

    root = tmp_path_factory.mktemp("dynamic") / "store"
    summary = generate_dataset(store=str(root), preset="dynamic-smoke", overrides=ONE)
    assert summary["failed_scenes"] == [] and summary["computed"] == 2 + 4 * 6
    return root


def arr(store: RunStore, sid: str, name: str) -> torch.Tensor:
    return torch.from_numpy(store.read_array(sid, name))


def masked_psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    err = (((a.float() - b.float()) / 255) ** 2 * mask).sum() / (mask.sum() * 3)
    return float(-10 * torch.log10(err))


def test_flow_renders_a_moving_scene_and_warps_each_frame_from_its_own_time(dynamic_store):
    config = build_config("dynamic-smoke", ONE)
    store = RunStore(dynamic_store, create=False)
    (record,) = scene_records(config)
    sid = record.scene_id
    assert sid == "dyn-000000" and {t for (_, t, _) in store.done_keys()} - {""} == {
        "left", "zoom_out", "left_flip", "zoom_out_flip"}
    video = arr(store, sid, "input/video/rgb")
    assert not torch.equal(video[0], video[-1]) and torch.equal(video[0], arr(store, sid, "input/rgb"))
    world = dynamic_world(config, record)
    h, w = config.video.height, config.video.width
    for name in ("left", "left_flip"):
        base = f"trajectories/{name}"
        cams = Cameras(arr(store, sid, f"{base}/cameras/c2w"), arr(store, sid, f"{base}/cameras/K"), h, w)
        times = arr(store, sid, f"{base}/cameras/times")
        teacher = arr(store, sid, f"{base}/teacher/rgb")
        # the oracle teacher is the moving scene at each frame's camera and time (flipped paths included)
        exact = world.render(cams.c2w, cams.K, h, w, times)
        assert torch.equal(teacher, (exact.rgb * 255).round().to(torch.uint8))
        torch.testing.assert_close(arr(store, sid, f"{base}/video_depth/depth"), exact.depth)
    # time-synchronised warping: frame t warped from input frame t matches the teacher where the mask holds; the
    # same frame warped from input frame 0 (a static pipeline's source) does not, on the moving objects
    base, t = "trajectories/left", 6
    mask = arr(store, sid, f"{base}/refine/mask")[t]
    teacher = arr(store, sid, f"{base}/teacher/rgb")[t]
    ours = masked_psnr(arr(store, sid, f"{base}/warp/rgb")[t], teacher, mask)
    in_c2w, K = arr(store, sid, "input/video/c2w"), arr(store, sid, "input/K")
    depth = arr(store, sid, "depth/video/depth")[0, 0]
    cams = Cameras(arr(store, sid, f"{base}/cameras/c2w"), arr(store, sid, f"{base}/cameras/K"), h, w)
    stale = forward_warp(video[0].float() / 127.5 - 1, depth, K, in_c2w[0], cams.K[t : t + 1],
                         cams.w2c[t : t + 1], source_mask=arr(store, sid, "depth/video/reliable")[0, 0])
    stale_rgb = ((stale.rgb[0] + 1) * 127.5).round().clamp(0, 255)
    both = mask & stale.mask[0]
    moving = torch.isin(world.render(cams.c2w[t : t + 1], cams.K[t : t + 1], h, w, [float(
        arr(store, sid, f"{base}/cameras/times")[t])]).object_id[0], torch.tensor([m.obj_id for m in world.motions]))
    assert ours > 20
    assert masked_psnr(stale_rgb, teacher, both & moving) + 3 < masked_psnr(arr(store, sid, f"{base}/warp/rgb")[t],
                                                                          teacher, both & moving)


def test_dynamic_layout_is_documented(dynamic_store):
    doc = (REPO / "storage_layout.md").read_text()
    documented = {}
    for line in doc.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and "/" in cells[0] and cells[1].startswith("(") and "diffusers only" not in cells[4] \
                and "long paths only" not in cells[4]:
            documented[cells[0]] = (cells[1], cells[2], cells[3])
    store = RunStore(dynamic_store, create=False)
    sym = {"T": 9, "H": 96, "W": 160}
    seen = set()
    for name, a in store.list_arrays("dyn-000000").items():
        parts = name.split("/")
        key = "/".join(["trajectories", "<trajectory>", *parts[2:]]) if parts[0] == "trajectories" else name
        assert key in documented, f"{name} is written but not documented in storage_layout.md"
        shape, dtype, chunks = documented[key]
        assert a.shape == tuple(eval(shape, {}, sym)) and str(a.dtype) == dtype, name  # noqa: S307
        assert tuple(a.chunks) == tuple(eval(chunks, {}, sym)), name  # noqa: S307
        assert a.metadata.dimension_names is not None, name
        seen.add(key)
    assert seen == set(documented), f"documented but not written: {set(documented) - seen}"


def test_rerun_does_nothing_and_static_keys_are_unchanged(dynamic_store):
    from flows.generate_dataset import generate_dataset

    again = generate_dataset(store=str(dynamic_store), preset="dynamic-smoke", overrides=ONE)
    assert again["computed"] == 0
    # the dynamic section joins only dynamic scenes' keys: a static store keeps its keys
    from lyra_ops.prompts import SceneRecord
    from lyra_pipeline.stages import plan_keys

    rec = SceneRecord("proc-000000", "x", None, "0" * 64, 1, "procedural")
    assert plan_keys(build_config("smoke"), rec) == plan_keys(build_config("smoke", {"dynamic": {"moving": 5}}), rec)


def test_bad_dynamic_configs_are_refused():
    with pytest.raises(LyraConfigError, match="trajectories.custom is not supported for dynamic scenes"):
        build_config("dynamic-smoke", {"trajectories": {"custom": "path.npz"}})
    with pytest.raises(LyraConfigError, match="dynamic.moving"):
        build_config("dynamic-smoke", {"dynamic": {"moving": -1}})


KILL = """
import sys
from lyra_pipeline.config import build_config
from tasks.sdg import SCENE_TASKS, sample_prompts
config = build_config("dynamic-smoke", {"scenes": {"num_scenes": 1}})
for scene in sample_prompts.fn(sys.argv[1], config):
    for task in SCENE_TASKS.values():
        task.fn(sys.argv[1], config, scene, "kill-test")
"""


def test_kill_mid_scene_resumes_to_identical_arrays(tmp_path, dynamic_store):
    url = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-c", KILL, str(url)], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:  # kill once some warps exist
        if list((url / "scenes.zarr").glob("dyn-000000/trajectories/*/warp/rgb")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = RunStore(url, create=False).done_keys()
    assert 0 < len(done) < 2 + 4 * 6, f"nothing to resume ({len(done)} units done)"
    subprocess.run([sys.executable, "-c", KILL, str(url)], env={**os.environ, "PYTHONPATH": str(REPO)}, check=True,
                   timeout=300)
    a, b = RunStore(url, create=False), RunStore(dynamic_store, create=False)
    names = sorted(b.list_arrays("dyn-000000"))
    assert names == sorted(a.list_arrays("dyn-000000"))
    for name in names:
        assert np.array_equal(a.read_array("dyn-000000", name), b.read_array("dyn-000000", name)), name
    shutil.rmtree(url)


@pytest.fixture(scope="module")
def user_video(tmp_path_factory):
    """A procedural dynamic scene written as a user would bring it: a video and its poses."""
    pytest.importorskip("imageio_ffmpeg")
    from lyra_ops.cameras import default_intrinsics
    from lyra_ops.dynamic import frame_times, input_camera_path, make_dynamic_scene
    from lyra_pipeline.video_input import write_video, write_video_poses

    folder = tmp_path_factory.mktemp("user")
    h, w, t = 96, 160, 9
    cams = input_camera_path(5, default_intrinsics(h, w), h, w, t)
    frames = make_dynamic_scene(5).render(cams.c2w, cams.K, h, w, frame_times(t)).rgb
    (folder / "street walk.txt").write_text("a room where things move")
    return (write_video(folder / "street walk.mp4", frames, fps=8),
            write_video_poses(folder / "street walk.npz", cams, torch.arange(t) / 8.0), frames, cams)


def lyra(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lyra_pipeline.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_lyra_run_video_makes_a_dynamic_scene_from_a_user_video(user_video, tmp_path):
    video, poses, frames, cams = user_video
    store = tmp_path / "store"
    out = lyra("run", "--video", str(video), "--poses", str(poses), "--preset", "dynamic-smoke", "--store",
               str(store))
    assert out.returncode == 0, out.stdout + out.stderr
    st = RunStore(store, create=False)
    (sid,) = st.scene_ids()
    assert sid == "street_walk" and st.read_prompts()[0]["text"] == "a room where things move"
    got = arr(st, sid, "input/video/rgb")
    assert torch.equal(got, (frames * 255).round().to(torch.uint8))  # the video, read back exactly
    torch.testing.assert_close(arr(st, sid, "input/video/c2w"), cams.c2w, atol=1e-6, rtol=0)
    teacher = st.scene_group(sid)["trajectories/left_flip/teacher/rgb"]
    assert teacher.attrs["generator"] == "warp_only" and teacher.shape == (9, 3, 96, 160)
    again = lyra("run", "--video", str(video), "--poses", str(poses), "--preset", "dynamic-smoke", "--store",
                 str(store))
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr


def test_lyra_run_video_bad_inputs_one_line_nothing_written(user_video, tmp_path):
    video, poses, frames, cams = user_video
    from lyra_pipeline.video_input import write_video_poses

    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\0" * 4096)
    short = write_video_poses(tmp_path / "short.npz", cams[:5], torch.arange(5) / 8.0)
    back = torch.arange(9) / 8.0
    back[3] = 0.0
    backwards = write_video_poses(tmp_path / "back.npz", cams, back)
    for args, expected in (
        (["--video", str(junk), "--poses", str(poses)], "cannot decode as a video"),
        (["--video", str(video), "--poses", str(short)], "5 poses but"),
        (["--video", str(video), "--poses", str(backwards)], "times must increase strictly"),
        (["--video", str(video)], "--video and --poses go together"),
    ):
        store = tmp_path / "store"
        out = lyra("run", *args, "--preset", "dynamic-smoke", "--store", str(store))
        lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
        assert out.returncode != 0 and len(lines) == 1 and expected in lines[0], lines
        assert not store.exists()


def test_a_failing_dynamic_scene_fails_alone(tmp_path, prefect_harness, monkeypatch):
    """Failure isolation as for static scenes: one dynamic scene's error fails that scene only, the other finishes,
    and the manifest records the failure."""
    from flows.generate_dataset import PipelineFailed, generate_dataset
    from lyra_pipeline import dynamic_stages

    real = dynamic_stages.make_input

    def broken(store, config, scene):
        if scene.scene_id == "dyn-000001":
            raise RuntimeError("corrupt input video")
        return real(store, config, scene)

    monkeypatch.setattr(dynamic_stages, "make_input", broken)
    root = tmp_path / "store"
    with pytest.raises(PipelineFailed, match="dyn-000001"):
        generate_dataset(store=str(root), preset="dynamic-smoke", overrides={"trajectories": {"names": ["left"]},
                                                                             "dynamic": {"flip": False}})
    store = RunStore(root, create=False)
    rows = store.read_manifest().to_pylist()
    failed = {(r["scene_id"], r["stage"]) for r in rows if r["status"] == "failed"}
    assert failed == {("dyn-000001", "input")}
    done = {r["scene_id"] for r in rows if r["status"] == "done" and r["stage"] == "video_depth"}
    assert done == {"dyn-000000"}
