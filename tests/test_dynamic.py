"""Dynamic procedural scenes and dynamic camera paths (lyra_ops.dynamic): exact renders at any pose and time,
textures attached to moving objects, motions clear of the room and the cameras, flip supervision consistent."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lyra_ops.cameras import default_intrinsics, invert_se3
from lyra_ops.dynamic import dynamic_path, frame_times, generation_order, input_camera_path, make_dynamic_scene
from lyra_ops.errors import LyraInputError
from lyra_ops.motions import Motion, _clear, moved
from lyra_ops.scenes import FIRST_OBJECT_ID, make_scene
from lyra_ops.trajectories import make_trajectory

H, W, T = 24, 32, 9


def test_time_zero_is_the_static_scene_and_objects_move_later():
    scene = make_dynamic_scene(3)
    K = default_intrinsics(H, W)
    cams = input_camera_path(3, K, H, W, T)
    still = make_scene(3).render(cams.c2w[:1], cams.K[:1], H, W)
    start = scene.render(cams.c2w[:1], cams.K[:1], H, W, [0.0])
    assert torch.equal(start.rgb, still.rgb) and torch.equal(start.depth, still.depth)
    later = scene.render(cams.c2w[:1], cams.K[:1], H, W, [0.5])
    moving = {m.obj_id for m in scene.motions}
    changed = (later.rgb != start.rgb).any(1, keepdim=True)
    # what changed lies on (or where there was) a moving object or its floor shadow, never on still objects only
    ids = set(start.object_id[changed].tolist()) | set(later.object_id[changed].tolist())
    still_objects = {int(i) for i in make_scene(3).object_ids.tolist()} - moving
    assert changed.any() and ids & moving and not (ids & still_objects)
    # deterministic from the seed
    assert make_dynamic_scene(3).motions == scene.motions and scene.describe()["motions"]


@pytest.mark.parametrize("kind", ["translate", "rotate", "bounce"])
def test_textures_move_with_their_object(kind):
    """A surface point carried rigidly from time 0 to time tau keeps its albedo: the texture is attached."""
    scene = make_dynamic_scene(1)
    prim = scene.params.prims[0]
    motion = {"translate": Motion(prim.obj_id, "translate", (0.6, 0.8), 0.3, 1.0, 0.4),
              "rotate": Motion(prim.obj_id, "rotate", amplitude=1.1),
              "bounce": Motion(prim.obj_id, "bounce", amplitude=0.3, cycles=1.0)}[kind]
    rng = np.random.default_rng(0)
    local = torch.tensor(rng.normal(size=(64, 3)))
    local = local / local.norm(dim=1, keepdim=True) * 0.5 * min(prim.half)  # points inside the object
    tau = 0.37
    after = moved(prim, motion, tau)
    dyaw = after.yaw - prim.yaw
    c, s = math.cos(dyaw), math.sin(dyaw)
    rot = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=torch.float64)
    p0 = local + torch.tensor(prim.center)
    p1 = local @ rot.T + torch.tensor(after.center)
    from dataclasses import replace

    from lyra_ops.dynamic import DynamicScene

    dyn = DynamicScene(scene.params, (motion,))
    a0 = dyn.at(0.0)._shade_group(prim.obj_id, *p0.T)
    a1 = dyn.at(tau)._shade_group(prim.obj_id, *p1.T)
    torch.testing.assert_close(a0, a1, atol=1e-5, rtol=0)  # float32 noise lattice: ~4e-7 apart
    swimming = dyn.at(0.0)._shade_group(prim.obj_id, *p1.T)  # a texture fixed in the world would read this
    assert (swimming - a0).abs().max() > 1e-2
    if kind != "rotate":
        assert after.center != prim.center
    assert replace(prim) == prim and after.obj_id == prim.obj_id >= FIRST_OBJECT_ID


def test_motions_stay_clear_of_room_objects_and_cameras():
    for seed in range(12):
        scene = make_dynamic_scene(seed)
        assert 1 <= len(scene.motions) <= 2
        prims = {p.obj_id: p for p in scene.params.prims}
        for m in scene.motions:
            others = [p for p in scene.params.prims if p.obj_id != m.obj_id]
            assert _clear(prims[m.obj_id], m, others, scene.params), (seed, m)


def test_dynamic_paths_compose_offsets_with_the_input_camera_and_flip_consistently():
    scene = make_dynamic_scene(2)
    K = default_intrinsics(H, W)
    inp = input_camera_path(2, K, H, W, T)
    assert torch.equal(inp.c2w[0], torch.eye(4))
    fwd = dynamic_path("left", inp, distance=0.3)
    flip = dynamic_path("left", inp, distance=0.3, flipped=True)
    offsets = invert_se3(make_trajectory("left", K, H, W, T, distance=0.3).c2w.double())
    # forward: w2c_t = M_t w2c_in_t; flipped, in time order: w2c_t = M_{T-1-t} w2c_in_t
    for t in range(T):
        torch.testing.assert_close(fwd.cameras.w2c[t].double(), offsets[t] @ inp.w2c[t].double(), atol=1e-5, rtol=0)
        torch.testing.assert_close(flip.cameras.w2c[t].double(), offsets[T - 1 - t] @ inp.w2c[t].double(),
                                   atol=1e-5, rtol=0)
    torch.testing.assert_close(flip.cameras.c2w[-1], inp.c2w[-1], atol=1e-5, rtol=0)  # starts from the last frame
    assert torch.equal(flip.times, frame_times(T)) and torch.equal(flip.source_frames, torch.arange(T))
    # the oracle teacher generating the flipped path renders in generation order (time running backwards);
    # reversed into time order those frames are exactly the ground truth at the stored poses and times
    cams, times, sources = generation_order(flip)
    assert times[0] == 1.0 and sources[0] == T - 1
    generated = scene.render(cams.c2w, cams.K, H, W, times).rgb
    stored = scene.render(flip.cameras.c2w, flip.cameras.K, H, W, flip.times).rgb
    assert torch.equal(generated.flip(0), stored)
    # the reference's saved order (poses left in generation order beside time-ordered frames) would not match
    wrong = scene.render(cams.c2w, cams.K, H, W, flip.times).rgb
    assert not torch.equal(wrong, stored)


def test_bad_times_are_refused():
    scene = make_dynamic_scene(0)
    K = default_intrinsics(H, W).expand(2, 3, 3)
    c2w = torch.eye(4).expand(2, 4, 4)
    with pytest.raises(LyraInputError, match="2 cameras but 1 times"):
        scene.render(c2w, K, H, W, [0.0])
    with pytest.raises(LyraInputError, match="finite"):
        scene.at(float("nan"))
    with pytest.raises(LyraInputError, match="at least 2 frames"):
        frame_times(1)
