"""Per-scene Gaussian optimisation baseline: RGB-D initialisation, optimisation, determinism, input checks.

Tiny sizes (48x64, 9-frame path) keep the file to a few seconds; torch runs single-threaded here because
OpenMP threads on busy shared cores made each step ~50x slower.
"""

from __future__ import annotations

import math

import pytest
import torch

from lyra_ops.cameras import default_intrinsics
from lyra_ops.errors import LyraConfigError, LyraInputError
from lyra_ops.gaussians import Gaussians
from lyra_ops.metrics import psnr
from lyra_ops.optimize import (
    OptimizeConfig,
    OptimizeResult,
    SceneOptimizer,
    init_gaussians_from_rgbd,
    optimize_scene,
    render_views,
)
from lyra_ops.rasterize import rasterize
from lyra_ops.scenes import make_scene
from lyra_ops.trajectories import make_trajectory
from lyra_ops.warp import unproject_depth

H, W = 48, 64
TRAIN = [0, 2, 4, 6, 8]
HELD_OUT = [1, 3, 5, 7]


pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def path_data():
    """Exact renders of a short 'right' path (9 frames) of procedural scene 0."""
    cams = make_trajectory("right", default_intrinsics(H, W), H, W, 9, distance=0.25)
    gt = make_scene(0).render(cams.c2w, cams.K, H, W)
    return cams, gt


def _init_from_ends(cams, gt, **kw) -> Gaussians:
    return Gaussians.cat([
        init_gaussians_from_rgbd(gt.rgb[i], gt.depth[i, 0], cams.K[i], cams.c2w[i], stride=2, opacity=0.5, **kw)
        for i in (0, 8)
    ])  # fmt: skip


def _held_out_psnr(g: Gaussians, cams, gt) -> float:
    out = render_views(g, cams[torch.tensor(HELD_OUT)])
    return float(psnr(out.rgb, gt.rgb[HELD_OUT]).mean())


# ------------------------------------------------------------------------------------------------------------
# Initialisation
# ------------------------------------------------------------------------------------------------------------


def test_init_geometry_and_attributes(path_data):
    cams, gt = path_data
    rgb, depth, k, c2w = gt.rgb[3], gt.depth[3, 0], cams.K[3], cams.c2w[3]
    g = init_gaussians_from_rgbd(rgb, depth, k, c2w, stride=2, opacity=0.3, scale_factor=0.75)
    assert g.num == (H // 2) * (W // 2)
    assert g.dtype == torch.float32
    pts = unproject_depth(depth, k, c2w)[1::2, 1::2].reshape(-1, 3)
    torch.testing.assert_close(g.means, pts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.colors, rgb[:, 1::2, 1::2].reshape(3, -1).T)
    expected_scale = 0.75 * 2 * depth[1::2, 1::2].reshape(-1) / k[0, 0]
    torch.testing.assert_close(g.scales, expected_scale[:, None].expand(-1, 3), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g.quats, torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(g.num, 4))
    assert torch.all(g.opacities == 0.3)


def test_init_skips_invalid_depth(path_data):
    cams, gt = path_data
    depth = gt.depth[0, 0].clone()
    depth[:10] = 0.0
    depth[10, :5] = float("nan")
    g = init_gaussians_from_rgbd(gt.rgb[0], depth, cams.K[0], cams.c2w[0])
    assert g.num == H * W - 10 * W - 5
    with pytest.raises(LyraInputError, match="no pixel"):
        init_gaussians_from_rgbd(gt.rgb[0], torch.zeros(H, W), cams.K[0], cams.c2w[0])


def test_init_renders_back_to_its_frame():
    """One opaque, sub-pixel Gaussian per pixel renders its own frame back (the limit is the rasterizer's
    0.3 px^2 anti-aliasing blur on this high-frequency texture: measured 22.3 dB at 48x64, 24.6 dB at 96x128;
    a box blur of sigma 0.5 px alone gives 28 dB)."""
    k = default_intrinsics(H, W)
    gt = make_scene(0).render(torch.eye(4)[None], k[None], H, W)
    g = init_gaussians_from_rgbd(gt.rgb[0], gt.depth[0, 0], k, torch.eye(4), opacity=0.99, scale_factor=0.3)
    out = rasterize(g, torch.eye(4)[None], k[None], W, H, background=torch.ones(3))
    assert float(psnr(out.rgb, gt.rgb)) > 21.0
    assert float(out.alpha.min()) > 0.95


# ------------------------------------------------------------------------------------------------------------
# Optimisation
# ------------------------------------------------------------------------------------------------------------


def test_optimize_improves_held_out_views(path_data):
    cams, gt = path_data
    init = _init_from_ends(cams, gt)
    config = OptimizeConfig(steps=60, seed=3)
    seen: list[int] = []
    result = optimize_scene(
        gt.rgb[TRAIN], cams[torch.tensor(TRAIN)], init, config, depths=gt.depth[TRAIN],
        callback=lambda step, loss, g: seen.append(step),
    )  # fmt: skip
    assert isinstance(result, OptimizeResult)
    assert len(result.losses) == 60 and seen == list(range(60))
    assert all(math.isfinite(v) for v in result.losses)
    assert result.seconds > 0
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.5 * first
    g = result.gaussians
    assert not g.means.requires_grad
    assert g.num == init.num
    assert float(g.colors.min()) >= 0.0 and float(g.colors.max()) <= 1.0
    before, after = _held_out_psnr(init, cams, gt), _held_out_psnr(g, cams, gt)
    assert after > before + 3.0, (before, after)


def test_densify_grows_and_improves(path_data):
    cams, gt = path_data
    init = _init_from_ends(cams, gt)
    config = OptimizeConfig(steps=60, densify=True, densify_from=20, densify_every=20, densify_until=60, seed=1)
    result = optimize_scene(gt.rgb[TRAIN], cams[torch.tensor(TRAIN)], init, config)
    assert result.gaussians.num > init.num
    assert result.gaussians.num <= config.max_gaussians
    assert _held_out_psnr(result.gaussians, cams, gt) > _held_out_psnr(init, cams, gt) + 3.0


def test_init_points_subsample_and_early_stop(path_data):
    cams, gt = path_data
    init = _init_from_ends(cams, gt)
    config = OptimizeConfig(steps=50, init_points=300, batch_views=2)
    result = optimize_scene(
        gt.rgb[TRAIN], cams[torch.tensor(TRAIN)], init, config, callback=lambda step, loss, g: step == 4
    )
    assert result.gaussians.num == 300
    assert len(result.losses) == 5


def test_deterministic_given_seed(path_data):
    cams, gt = path_data
    init = _init_from_ends(cams, gt)
    frames, train_cams = gt.rgb[TRAIN], cams[torch.tensor(TRAIN)]

    def run(seed: int):
        config = OptimizeConfig(steps=12, seed=seed, init_points=800, densify=True, densify_from=5, densify_every=5)
        return optimize_scene(frames, train_cams, init, config, depths=gt.depth[TRAIN])

    a, b, c = run(7), run(7), run(8)
    assert a.losses == b.losses
    for name in ("means", "scales", "quats", "opacities", "colors"):
        assert torch.equal(getattr(a.gaussians, name), getattr(b.gaussians, name)), name
    assert a.losses != c.losses


@pytest.mark.parametrize("random_background", [False, True])
def test_resume_from_state_is_bit_exact(path_data, random_background):
    """Stopping after any step, saving the state through safetensors bytes and resuming in a new optimiser gives
    exactly the Gaussians of an uninterrupted run (densification and a stop inside a densify interval included)."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    cams, gt = path_data
    init = _init_from_ends(cams, gt)
    frames, train_cams, depths = gt.rgb[TRAIN], cams[torch.tensor(TRAIN)], gt.depth[TRAIN]
    config = OptimizeConfig(steps=14, seed=5, init_points=700, batch_views=2, densify=True, densify_from=4,
                            densify_every=4, random_background=random_background)
    whole = SceneOptimizer(frames, train_cams, init, config, depths=depths)
    losses = whole.run()
    first = SceneOptimizer(frames, train_cams, init, config, depths=depths)
    part = first.run(until=6)
    saved = st_save(first.state_tensors())
    resumed = SceneOptimizer(frames, train_cams, init, config, depths=depths)
    resumed.load_state_tensors(st_load(saved))
    assert resumed.step == 6
    part += resumed.run()
    assert part == losses and resumed.step == 14
    a, b = whole.gaussians(), resumed.gaussians()
    assert a.num > 700  # densification happened after the stop
    for name in ("means", "scales", "quats", "opacities", "colors"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    with pytest.raises(LyraInputError, match="lacks"):
        resumed.load_state_tensors({k: v for k, v in st_load(saved).items() if k != "rng"})


def test_random_background_makes_covered_pixels_opaque(path_data):
    """With a random background per view the optimiser cannot lean on white showing through: trained views end
    nearly opaque everywhere, and their renders over black and over white agree."""
    cams, gt = path_data
    init = _init_from_ends(cams, gt)
    train_cams = cams[torch.tensor(TRAIN)]
    config = OptimizeConfig(steps=80, seed=2, random_background=True)
    opt = SceneOptimizer(gt.rgb[TRAIN], train_cams, init, config)
    opt.run()
    g = opt.gaussians()
    white = render_views(g, train_cams, background=(1.0, 1.0, 1.0))
    black = render_views(g, train_cams, background=(0.0, 0.0, 0.0))
    white_only = optimize_scene(gt.rgb[TRAIN], train_cams, init, OptimizeConfig(steps=80, seed=2)).gaussians
    w2 = render_views(white_only, train_cams, background=(1.0, 1.0, 1.0))
    b2 = render_views(white_only, train_cams, background=(0.0, 0.0, 0.0))
    gap_random = float((white.rgb - black.rgb).abs().mean())
    gap_white = float((w2.rgb - b2.rgb).abs().mean())
    assert gap_random < 0.5 * gap_white, (gap_random, gap_white)


def test_zero_steps_returns_init(path_data):
    cams, gt = path_data
    init = _init_from_ends(cams, gt)
    result = optimize_scene(gt.rgb[TRAIN], cams[torch.tensor(TRAIN)], init, OptimizeConfig(steps=0))
    assert result.losses == []
    torch.testing.assert_close(result.gaussians.means, init.means)
    torch.testing.assert_close(result.gaussians.opacities, init.opacities)
    torch.testing.assert_close(result.gaussians.scales, init.scales)


# ------------------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise(path_data):
    cams, gt = path_data
    init = _init_from_ends(cams, gt)
    frames, train_cams = gt.rgb[TRAIN], cams[torch.tensor(TRAIN)]
    config = OptimizeConfig(steps=1)
    with pytest.raises(LyraInputError, match="cameras must describe the N = 5 frames, got 4"):
        optimize_scene(frames, train_cams[:4], init, config)
    with pytest.raises(LyraInputError, match=r"frames must hold finite values in \[0, 1\]"):
        optimize_scene(frames * 2.0, train_cams, init, config)
    nan_frames = frames.clone()
    nan_frames[0, 0, 0, 0] = float("nan")
    with pytest.raises(LyraInputError, match="frames"):
        optimize_scene(nan_frames, train_cams, init, config)
    with pytest.raises(LyraInputError, match=r"shape \(N, 3, H, W\)"):
        optimize_scene(frames[:, :1], train_cams, init, config)
    with pytest.raises(LyraInputError, match="cameras are 48x64"):
        optimize_scene(frames[..., :32], train_cams, init, config)
    with pytest.raises(LyraInputError, match="depths"):
        optimize_scene(frames, train_cams, init, config, depths=gt.depth[:3])
    with pytest.raises(LyraInputError, match="at least one Gaussian"):
        optimize_scene(frames, train_cams, init.index(torch.zeros(0, dtype=torch.long)), config)
    with pytest.raises(LyraInputError, match="rgb"):
        init_gaussians_from_rgbd(gt.rgb[0] + 1.0, gt.depth[0, 0], cams.K[0], cams.c2w[0])
    with pytest.raises(LyraInputError, match="depth must be a tensor of shape"):
        init_gaussians_from_rgbd(gt.rgb[0], gt.depth[0], cams.K[0], cams.c2w[0])
    with pytest.raises(LyraInputError, match="stride"):
        init_gaussians_from_rgbd(gt.rgb[0], gt.depth[0, 0], cams.K[0], cams.c2w[0], stride=0)
    with pytest.raises(LyraInputError, match="opacity"):
        init_gaussians_from_rgbd(gt.rgb[0], gt.depth[0, 0], cams.K[0], cams.c2w[0], opacity=0.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"steps": -1}, "steps"),
        ({"batch_views": 0}, "batch_views"),
        ({"lr_means": float("nan")}, "lr_means"),
        ({"init_points": 0}, "init_points"),
        ({"background": (1.0, 1.0)}, "background"),
        ({"backend": "cuda"}, "backend"),
        ({"lr_means_final_ratio": 0.0}, "lr_means_final_ratio"),
    ],
)
def test_bad_config_raises(kwargs, field):
    with pytest.raises(LyraConfigError, match=f"OptimizeConfig.{field}"):
        OptimizeConfig(**kwargs)
