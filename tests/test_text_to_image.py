"""Text-only scenes: composed or file prompts, first frames from a tiny random text-to-image pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lyra_ops.errors import LyraConfigError, LyraInputError
from lyra_ops.prompts import compose_prompts
from lyra_pipeline.config import build_config
from lyra_pipeline.storage import RunStore

pytest.importorskip("transformers")

from lyra_pipeline.backends.tiny import make_tiny_pixart  # noqa: E402


def test_composed_prompts_are_seeded_and_distinct():
    a = compose_prompts(200, seed=1)
    assert len(set(a)) == 200 and a == compose_prompts(200, seed=1) and a != compose_prompts(200, seed=2)
    assert all(p.count(",") >= 2 for p in a)
    with pytest.raises(ValueError, match="template grid holds"):
        compose_prompts(10**6, seed=0)


@pytest.fixture(scope="module")
def tiny_pixart(tmp_path_factory):
    return make_tiny_pixart(tmp_path_factory.mktemp("t2i") / "pixart")


def text_config(model, prompts_file=None, n=2):
    scenes = {"source": "text", "num_scenes": n}
    if prompts_file:
        scenes["prompts_file"] = str(prompts_file)
    return build_config("smoke", {"scenes": scenes, "text_to_image": {"model_path": str(model), "steps": 2,
                                                                       "max_text_tokens": 16},
                                  "depth": {"backend": "planar"}, "generator": {"backend": "warp_only"}})


def test_text_scenes_get_seeded_first_frames(tiny_pixart, tmp_path):
    from tasks.sdg import make_input, sample_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na quiet reading room\n\na quiet reading room\na red barn at dusk\n")
    config = text_config(tiny_pixart, prompts)
    scenes = sample_prompts.fn(str(tmp_path / "a"), config)
    assert sorted(s.text for s in scenes) == ["a quiet reading room", "a red barn at dusk"]  # deduplicated
    assert all(s.source == "text" and s.scene_id.startswith("text-") for s in scenes)
    for s in scenes:
        assert make_input.fn(str(tmp_path / "a"), config, s).computed == 1
        assert make_input.fn(str(tmp_path / "a"), config, s).computed == 0  # done: skipped
    rgb = RunStore(tmp_path / "a").read_array(scenes[0].scene_id, "input/rgb")
    assert rgb.shape == (3, 96, 160) and rgb.std() > 0
    # same seed -> same image, in another store
    make_input.fn(str(tmp_path / "b"), config, scenes[0])
    np.testing.assert_array_equal(RunStore(tmp_path / "b").read_array(scenes[0].scene_id, "input/rgb"), rgb)
    # composed prompts when no file is given
    composed = sample_prompts.fn(str(tmp_path / "c"), text_config(tiny_pixart, n=3))
    assert len(composed) == 3 and len({s.text for s in composed}) == 3


def test_text_source_errors(tiny_pixart, tmp_path):
    from lyra_pipeline.planning import preflight

    with pytest.raises(LyraConfigError, match="text_to_image.model_path is required"):
        build_config("smoke", {"scenes": {"source": "text"}, "depth": {"backend": "planar"},
                               "generator": {"backend": "warp_only"}})
    with pytest.raises(LyraConfigError, match="cannot serve generated first frames"):
        build_config("smoke", {"scenes": {"source": "text"}, "text_to_image": {"model_path": str(tiny_pixart)},
                               "generator": {"backend": "warp_only"}})
    with pytest.raises(LyraInputError, match="prompts file not found"):
        preflight(text_config(tiny_pixart, tmp_path / "missing.txt"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(LyraConfigError, match="not a supported text-to-image pipeline"):
        preflight(text_config(bad))


def test_reconstruct_prompt_text_to_3d(tiny_pixart, tmp_path):
    """`lyra reconstruct --prompt` without an image: the tiny PixArt folder makes the first frame, the rest is the
    image path (PLY + strip); without a text-to-image pipeline one clear line and nothing written."""
    from typer.testing import CliRunner

    from lyra_ops.gaussians import Gaussians
    from lyra_pipeline.cli import app

    runner = CliRunner()
    out = tmp_path / "r"
    res = runner.invoke(app, ["reconstruct", "--prompt", "a red barn at dusk", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "needs a text-to-image pipeline: pass --text-to-image DIR" in res.output
    assert not out.exists()
    res = runner.invoke(app, ["reconstruct", "--prompt", "a red barn", "--text-to-image", str(tmp_path / "nope"),
                              "--out", str(out)])
    assert res.exit_code == 2 and "nope" in res.output, res.output
    assert not out.exists()
    config = tmp_path / "t2i.yaml"
    config.write_text("text_to_image:\n  steps: 2\n  max_text_tokens: 16\n")
    res = runner.invoke(app, ["reconstruct", "--prompt", "a red barn at dusk", "--text-to-image", str(tiny_pixart),
                              "--config", str(config), "--preset", "smoke", "--out", str(out)])
    assert res.exit_code == 0, res.output
    plys = list(out.glob("text-*.ply"))
    assert len(plys) == 1 and Gaussians.from_ply(plys[0]).num > 1000
    assert plys[0].with_suffix(".png").is_file()
    assert (out / "input" / f"{plys[0].stem}.png").is_file()
    assert (out / "input" / "prompt.txt").read_text().strip() == "a red barn at dusk"
