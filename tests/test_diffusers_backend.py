"""The diffusers video backend with tiny random-initialised Wan checkpoints built in the tests: GEN3C widening,
checkpoint validation, the SDG flow end to end, determinism and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lyra_ops.errors import LyraConfigError
from lyra_ops.gen3c import combine_guidance, widen_conv_input
from lyra_pipeline.backends.diffusers_video import (
    DiffusersVideoGenerator,
    inspect_checkpoint,
    save_conditioned_transformer,
    widen_transformer,
)
from lyra_pipeline.backends.tiny import make_tiny_cogvideox, make_tiny_wan
from lyra_pipeline.config import build_config
from lyra_pipeline.storage import RunStore

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory) -> Path:
    return make_tiny_wan(tmp_path_factory.mktemp("ckpt") / "tiny-wan")


@pytest.fixture(scope="module")
def tiny_wan_i2v(tmp_path_factory) -> Path:
    return make_tiny_wan(tmp_path_factory.mktemp("ckpt") / "tiny-wan-i2v", i2v=True)


def test_widen_conv_input_keeps_the_base_output():
    for conv in (torch.nn.Conv3d(5, 7, (1, 2, 2), stride=(1, 2, 2)), torch.nn.Conv2d(5, 7, 3, padding=1)):
        wide = widen_conv_input(conv, 4)
        x = torch.randn(2, 5, *([3] if isinstance(conv, torch.nn.Conv3d) else []), 8, 8)
        extra = torch.randn(x.shape[0], 4, *x.shape[2:])
        assert wide.in_channels == 9 and torch.equal(wide.weight[:, 5:], torch.zeros_like(wide.weight[:, 5:]))
        torch.testing.assert_close(wide(torch.cat([x, extra], 1)), conv(x), rtol=0, atol=1e-6)
    with pytest.raises(LyraConfigError, match="Conv2d/Conv3d"):
        widen_conv_input(torch.nn.Linear(4, 4), 2)
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert combine_guidance(cond, uncond, 1.0).item() == 3.0 and combine_guidance(cond, uncond, 0.0).item() == 2.0


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_zero_init_widened_transformer_equals_base(family, tiny_wan, tmp_path):
    import diffusers

    from lyra_pipeline.backends.diffusers_video import FAMILIES

    ckpt = tiny_wan if family == "wan" else make_tiny_cogvideox(tmp_path / "cog")
    info = inspect_checkpoint(ckpt)
    cls = getattr(diffusers, FAMILIES[family].classes["transformer"])
    base = cls.from_pretrained(ckpt / "transformer", local_files_only=True).eval()
    wide = widen_transformer(cls.from_pretrained(ckpt / "transformer", local_files_only=True), info).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 8, generator=g)
    extra = torch.randn(1, info.gen3c_channels, 3, 8, 8, generator=g)
    text = torch.randn(1, 16, 32, generator=g)
    t = torch.tensor([500])
    kwargs = {}
    if family == "cogvideox":  # frames-first layout and rotary position embeddings
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        kwargs["image_rotary_emb"] = get_3d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), 3, device="cpu")

    def run(model, hidden):
        if family == "cogvideox":
            hidden = hidden.permute(0, 2, 1, 3, 4)
        with torch.no_grad():
            return model(hidden_states=hidden, timestep=t, encoder_hidden_states=text, return_dict=False,
                         **kwargs)[0]

    out_base, out_wide = run(base, x), run(wide, torch.cat([x, extra], 1))
    assert (out_base - out_wide).abs().max().item() == 0.0
    # saved with save_pretrained and reloaded as a conditioned transformer: same width, same output
    path = save_conditioned_transformer(str(ckpt), tmp_path / "conditioned")
    assert json.loads((path / "config.json").read_text())["in_channels"] == 16 + info.gen3c_channels
    inspect_checkpoint(ckpt, str(path))
    again = cls.from_pretrained(path, local_files_only=True).eval()
    assert torch.equal(run(again, torch.cat([x, extra], 1)), out_wide)


def broken_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def test_bad_checkpoints_fail_clearly_before_work(tiny_wan, tmp_path):
    from lyra_pipeline.planning import preflight

    with pytest.raises(LyraConfigError, match="is not a directory"):
        inspect_checkpoint(tmp_path / "nope")

    def no_index(p):
        (p / "model_index.json").unlink()

    def bad_json(p):
        (p / "model_index.json").write_text("{not json")

    def family(p):
        doc = json.loads((p / "model_index.json").read_text())
        doc["_class_name"] = "StableDiffusionXLPipeline"
        (p / "model_index.json").write_text(json.dumps(doc))

    def truncated(p):
        f = p / "transformer" / "diffusion_pytorch_model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])

    def mismatch(p):
        doc = json.loads((p / "vae" / "config.json").read_text())
        doc["z_dim"] = 8
        (p / "vae" / "config.json").write_text(json.dumps(doc))

    def no_vae(p):
        shutil.rmtree(p / "vae")

    cases = [(no_index, "model_index.json: missing"), (bad_json, "corrupt pipeline index"),
             (family, "StableDiffusionXLPipeline' is not a supported video model family"),
             (truncated, "corrupt safetensors file"), (mismatch, "mismatched VAE/transformer pair"),
             (no_vae, "component folder 'vae' missing")]
    for i, (edit, message) in enumerate(cases):
        folder = broken_copy(tiny_wan, tmp_path / f"case{i}", edit)
        with pytest.raises(LyraConfigError, match=message):
            inspect_checkpoint(folder)
        config = build_config("smoke", {"generator": {"backend": "diffusers", "model_path": str(folder)},
                                        "video": {"height": 64, "width": 64}})
        with pytest.raises(LyraConfigError, match=message):
            preflight(config)
    with pytest.raises(LyraConfigError, match="needs 4k\\+1 frames|multiples of 16"):
        preflight(build_config("smoke", {"generator": {"backend": "diffusers", "model_path": str(tiny_wan)},
                                         "video": {"height": 72, "width": 64}}))
    with pytest.raises(LyraConfigError, match="model_path is required"):
        build_config("smoke", {"generator": {"backend": "diffusers"}})


def overrides(model: Path) -> dict:
    return {"scenes": {"num_scenes": 1}, "video": {"height": 64, "width": 64, "num_frames": 9},
            "trajectories": {"names": ["left", "zoom_in"]},
            "generator": {"backend": "diffusers", "model_path": str(model), "steps": 2, "max_text_tokens": 16},
            "latents": {"encoder": "vae", "dtype": "float32"}}


def test_sdg_flow_with_tiny_diffusers_model(tiny_wan, tmp_path, prefect_harness):
    from flows.generate_dataset import generate_dataset
    from tasks.sdg import SCENE_TASKS, sample_prompts

    over = overrides(tiny_wan)
    store_path = tmp_path / "store"
    summary = generate_dataset(store=str(store_path), preset="smoke", overrides=over)
    assert summary["failed_scenes"] == [] and summary["computed_by_stage"]["generate"] == 2
    store = RunStore(store_path)
    sid = store.scene_ids()[0]
    teacher = store.read_array(sid, "trajectories/left/teacher/rgb")
    latents = store.read_array(sid, "trajectories/left/latents")
    assert teacher.shape == (9, 3, 64, 64) and latents.shape == (16, 3, 8, 8)
    np.testing.assert_array_equal(latents, store.read_array(sid, "trajectories/left/teacher/latents"))
    attrs = store.scene_group(sid)["trajectories/left/teacher/rgb"].attrs
    assert attrs["generator"] == "diffusers-wan-t2v"
    assert len(list((store_path / "cache" / "text").glob("*.safetensors"))) == 2  # prompt + negative prompt
    # resume: a second run does no stage work
    again = generate_dataset(store=str(store_path), preset="smoke", overrides=over)
    assert again["computed"] == 0
    # deterministic: the same scene generated elsewhere, in-process, gives identical frames and latents
    other = tmp_path / "other"
    config = build_config("smoke", over)
    for scene in sample_prompts.fn(str(other), config):
        for task in SCENE_TASKS.values():
            task.fn(str(other), config, scene, "again")
    np.testing.assert_array_equal(RunStore(other).read_array(sid, "trajectories/left/teacher/rgb"), teacher)
    np.testing.assert_array_equal(RunStore(other).read_array(sid, "trajectories/left/latents"), latents)


def test_i2v_generator_and_seed_dependence(tiny_wan_i2v):
    from lyra_ops.cameras import default_intrinsics
    from lyra_ops.trajectories import make_trajectory

    gen = DiffusersVideoGenerator(str(tiny_wan_i2v), steps=2, max_text_tokens=8, guidance=0.0)
    assert gen.info.mode == "i2v" and gen.info.conditioned_in_channels == 36 + 32
    cams = make_trajectory("left", default_intrinsics(64, 64), 64, 64, 9, distance=0.2)
    g = torch.Generator().manual_seed(0)
    first = torch.rand(3, 64, 64, generator=g)
    warped = torch.rand(9, 3, 64, 64, generator=g) * 2 - 1
    mask = torch.rand(9, 1, 64, 64, generator=g) > 0.5
    a, la = gen.generate_with_latents(first, "a room", cams, warped, mask, seed=1)
    b, lb = gen.generate_with_latents(first, "a room", cams, warped, mask, seed=2)
    assert a.shape == (9, 3, 64, 64) and la.shape == (16, 3, 8, 8)
    assert torch.equal(a[0], first) and not torch.equal(la, lb)


@pytest.mark.parametrize("i2v", [False, True])
def test_cogvideox_generator(tmp_path, i2v):
    from lyra_ops.cameras import default_intrinsics
    from lyra_ops.trajectories import make_trajectory

    path = make_tiny_cogvideox(tmp_path / "cog", i2v=i2v)
    gen = DiffusersVideoGenerator(str(path), steps=2, max_text_tokens=16)
    assert gen.name == f"diffusers-cogvideox-{'i2v' if i2v else 't2v'}"
    assert gen.info.conditioned_in_channels == (32 + 32 if i2v else 16 + 33)
    cams = make_trajectory("left", default_intrinsics(64, 64), 64, 64, 9, distance=0.2)
    g = torch.Generator().manual_seed(0)
    first, warped = torch.rand(3, 64, 64, generator=g), torch.rand(9, 3, 64, 64, generator=g) * 2 - 1
    mask = torch.rand(9, 1, 64, 64, generator=g) > 0.5
    frames, latents = gen.generate_with_latents(first, "a room", cams, warped, mask, seed=1)
    assert frames.shape == (9, 3, 64, 64) and latents.shape == (16, 3, 8, 8)
    again, latents2 = gen.generate_with_latents(first, "a room", cams, warped, mask, seed=1)
    assert torch.equal(latents, latents2) and torch.equal(frames, again)
