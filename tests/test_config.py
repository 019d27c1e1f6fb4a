from pathlib import Path

import pytest

from lyra_ops.errors import LyraConfigError
from lyra_pipeline.config import PRESETS, build_config, load_config_file

REPO = Path(__file__).resolve().parents[1]


def test_presets_build():
    for name in PRESETS:
        cfg = build_config(name)
        assert cfg.video.height % 8 == 0
    assert build_config("default").video.height == 176


def test_unknown_key_names_path_and_closest_key():
    with pytest.raises(LyraConfigError, match=r"unknown config key 'video\.heigth'; did you mean 'video\.height'"):
        build_config("smoke", {"video": {"heigth": 64}})
    with pytest.raises(LyraConfigError, match=r"unknown config key 'sceens'; did you mean 'scenes'"):
        build_config("smoke", {"sceens": {"num_scenes": 3}})


def test_bad_values_and_presets():
    with pytest.raises(LyraConfigError, match=r"video\.num_frames"):
        build_config("smoke", {"video": {"num_frames": 5}})
    with pytest.raises(LyraConfigError, match=r"multiples of 16"):
        build_config("smoke", {"video": {"height": 88}})
    with pytest.raises(LyraConfigError, match=r"8k\+1.*nearest valid: 17 or 25"):
        build_config("smoke", {"video": {"num_frames": 20}})
    with pytest.raises(LyraConfigError, match=r"did you mean 'zoom_in'"):
        build_config("smoke", {"trajectories": {"names": ["zoomin"]}})
    with pytest.raises(LyraConfigError, match=r"did you mean 'smoke'"):
        build_config("smoek")
    with pytest.raises(LyraConfigError, match=r"generator\.clip_overlap 9: expected fewer frames than a clip "
                                              r"\(video\.num_frames 9\)"):
        build_config("smoke", {"generator": {"clip_overlap": 9}})
    with pytest.raises(LyraConfigError, match=r"generator\.clip_overlap"):
        build_config("smoke", {"generator": {"clip_overlap": 0}})
    with pytest.raises(LyraConfigError, match=r"'oracle' renders procedural scenes only"):
        build_config("smoke", {"scenes": {"source": "images", "images_dir": "/x"}, "depth": {"backend": "planar"}})


def test_config_files(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: default\nscenes:\n  num_scenes: 3\n")
    preset, over = load_config_file(p)
    assert preset == "default" and build_config(preset, over).scenes.num_scenes == 3
    p.write_text("- a\n- b\n")
    with pytest.raises(LyraConfigError, match=r"c\.yaml: top level must be a mapping"):
        load_config_file(p)
    with pytest.raises(LyraConfigError, match="not found"):
        load_config_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    preset, over = load_config_file(path)
    if over.get("scenes", {}).get("images_dir"):
        over["scenes"]["images_dir"] = "/tmp"
    build_config(preset or "smoke", over, source=str(path))


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_training_configs_validate(path):
    from lyra_pipeline.training import build_train_config

    preset, over = load_config_file(path)
    build_train_config(preset or "default", over, source=str(path))
