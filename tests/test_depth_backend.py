"""The transformers depth backend with tiny random Depth Anything models built in the tests."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lyra_ops.cameras import default_intrinsics
from lyra_ops.errors import LyraConfigError
from lyra_pipeline.config import build_config

pytest.importorskip("transformers")

from lyra_pipeline.backends.tiny import make_tiny_depth  # noqa: E402
from lyra_pipeline.backends.transformers_depth import (  # noqa: E402
    TransformersDepth,
    depth_kind,
    inspect_depth_checkpoint,
    relative_to_metric,
)


def test_relative_to_metric_maps_disparity_into_near_far():
    disparity = torch.linspace(0, 1, 101).reshape(1, 101)
    depth = relative_to_metric(disparity, 0.5, 20.0)
    assert depth[0, 0].item() == pytest.approx(20.0) and depth[0, -1].item() == pytest.approx(0.5)
    assert bool((depth[0, 1:] <= depth[0, :-1]).all())  # nearer (larger disparity) -> smaller depth
    # affine invariance: a*d + b gives the same depth
    torch.testing.assert_close(relative_to_metric(3 * disparity + 7, 0.5, 20.0), depth, rtol=1e-5, atol=1e-4)
    assert depth_kind({"depth_estimation_type": "metric"}) == "metric"
    assert depth_kind({"model_type": "dpt"}) == "relative" and depth_kind({"model_type": "zoedepth"}) == "metric"
    assert depth_kind({"model_type": "dpt"}, "metric") == "metric"


@pytest.mark.parametrize("kind", ["relative", "metric"])
def test_tiny_depth_model_estimates(tmp_path, kind):
    path = make_tiny_depth(tmp_path / "depth", kind=kind)
    est = TransformersDepth(str(path), near=0.5, far=20.0)
    assert est.kind == kind
    image = torch.rand(3, 48, 80, generator=torch.Generator().manual_seed(0))
    pred = est.estimate(image, default_intrinsics(48, 80))
    assert pred.depth.shape == (48, 80) and pred.valid.shape == (48, 80)
    assert bool(torch.isfinite(pred.depth[pred.valid]).all()) and kind in pred.label
    if kind == "relative":
        assert pred.depth.min() >= 0.5 - 1e-4 and pred.depth.max() <= 20.0 + 1e-3
    assert torch.equal(est.estimate(image, default_intrinsics(48, 80)).depth, pred.depth)  # deterministic


def test_depth_checkpoint_errors(tmp_path):
    from lyra_pipeline.planning import preflight

    with pytest.raises(LyraConfigError, match="is not a directory"):
        inspect_depth_checkpoint(tmp_path / "missing")
    path = make_tiny_depth(tmp_path / "depth")
    bad = shutil.copytree(path, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["Dinov2Model"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LyraConfigError, match="no \\*ForDepthEstimation model"):
        inspect_depth_checkpoint(bad)
    with pytest.raises(LyraConfigError, match="model_path is required"):
        build_config("smoke", {"depth": {"backend": "transformers"}})
    config = build_config("smoke", {"depth": {"backend": "transformers", "model_path": str(bad)}})
    with pytest.raises(LyraConfigError, match="ForDepthEstimation"):
        preflight(config)


def test_depth_stage_with_transformers_backend(tmp_path, examples_dir):
    from lyra_pipeline.storage import RunStore
    from tasks.sdg import estimate_depth, make_input, sample_prompts

    path = make_tiny_depth(tmp_path / "depth")
    config = build_config("smoke", {
        "scenes": {"source": "images", "images_dir": str(examples_dir / "samples"), "num_scenes": 1},
        "depth": {"backend": "transformers", "model_path": str(path)}, "generator": {"backend": "warp_only"},
    })  # fmt: skip
    store = tmp_path / "store"
    scene = sample_prompts.fn(str(store), config)[0]
    make_input.fn(str(store), config, scene)
    assert estimate_depth.fn(str(store), config, scene).computed == 1
    depth = RunStore(store).read_array(scene.scene_id, "depth/depth")
    assert depth.shape == (96, 160) and (depth > 0).all()
    label = RunStore(store).scene_group(scene.scene_id)["depth/depth"].attrs["label"]
    assert "relative" in label
    assert estimate_depth.fn(str(store), config, scene).computed == 0  # resumable like every stage
