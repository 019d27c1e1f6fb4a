"""The decoder shipped as package data (``lyra_pipeline/weights/decoder``) and the decoder resolution order of
``lyra reconstruct`` / ``export-ply`` / ``view``: explicit --checkpoint, else the store's finished training, else
the shipped decoder.

A tiny random decoder stands in for the shipped one (``SHIPPED_DECODER`` pointed at a tmp folder); the last test
checks the real shipped files once they exist.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save
from typer.testing import CliRunner

import lyra_pipeline.shipped as shipped_mod
from lyra_ops.decoder import DecoderConfig, LatentGaussianDecoder
from lyra_ops.errors import LyraConfigError
from lyra_ops.gaussians import BACKDROP_COUNT, Gaussians
from lyra_pipeline.cli import app
from lyra_pipeline.reconstruct import decode_scene, export_scene, load_decoder
from lyra_pipeline.shipped import INFO_KEYS, shipped_decoder, shipped_decoder_info
from lyra_pipeline.storage import RunStore
from lyra_pipeline.training import LATEST

REAL_SHIPPED = shipped_mod.SHIPPED_DECODER  # captured before any test points it elsewhere
SHIPPED_LOG = "decoder: shipped package decoder"


def decoder_bytes(seed: int) -> bytes:
    """A tiny random decoder in ``save_checkpoint``'s format (weights + ``decoder_config`` metadata)."""
    config = DecoderConfig.preset("tiny", far=20.0)
    model = LatentGaussianDecoder(config, seed=seed)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return st_save(state, metadata={"decoder_config": json.dumps(config.to_dict(), sort_keys=True)})


def write_shipped(root: Path, seed: int = 0) -> Path:
    """A shipped-decoder folder: model.safetensors + decoder.json."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.safetensors").write_bytes(decoder_bytes(seed))
    info = {"config": {"decoder": "tiny"}, "data_fingerprint": "test", "steps": 7, "cpu_seconds": 1.5,
            "held_out": [], "train_scenes": 3}
    (root / "decoder.json").write_text(json.dumps(info), encoding="utf-8")
    return root


def synthetic_image(path: Path) -> Path:
    """A 128x192 image with structure (so depth and warps are not degenerate) and a prompt beside it."""
    y, x = np.mgrid[0:128, 0:192]
    rgb = np.stack([(x * 1.3) % 256, (y * 2.0) % 256, ((x // 16 + y // 16) % 2) * 200 + 30], axis=-1)
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    path.with_suffix(".txt").write_text("a test room", encoding="utf-8")
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reconstructed(shipped, tmp_path_factory):
    """``lyra reconstruct`` of one image with no --checkpoint and no trained store (the --store path is absent)."""
    base = tmp_path_factory.mktemp("reconstruct")
    image = synthetic_image(base / "room.png")
    out, no_store = base / "R", base / "lyra_store"
    result = invoke("reconstruct", "--image", str(image), "--preset", "smoke", "--out", str(out),
                    "--store", str(no_store))
    assert result.exit_code == 0, result.output
    return out, no_store, result.output


def scene_of(out: Path) -> tuple[RunStore, str]:
    store = RunStore(out / "store", create=False)
    return store, store.scene_ids()[0]


def assert_ply_from(ply: Path, model, store: RunStore, scene: str) -> None:
    """The PLY holds exactly ``model``'s Gaussians of ``scene`` (then the export's backdrop)."""
    expected, _, _ = decode_scene(model, store, scene)
    back = Gaussians.from_ply(ply)
    assert back.num == expected.num + BACKDROP_COUNT
    torch.testing.assert_close(back.means[: expected.num], expected.means)


def test_shipped_decoder_loads_with_its_description(shipped):
    model, source = shipped_decoder()
    assert source == f"shipped package decoder {shipped} (trained 7 steps on 3 procedural scenes)"
    assert model.config == DecoderConfig.preset("tiny", far=20.0) and not model.training
    reference = LatentGaussianDecoder(model.config, seed=0).state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, reference[name])
    assert shipped_decoder_info()["steps"] == 7


def test_reconstruct_without_checkpoint_or_store_uses_the_shipped_decoder(reconstructed):
    out, no_store, output = reconstructed
    assert output.splitlines()[0] == f"{SHIPPED_LOG} {shipped_mod.SHIPPED_DECODER} (trained 7 steps on 3 procedural " \
                                     "scenes)"
    assert not no_store.exists(), "the absent training store must not be created"
    store, scene = scene_of(out)
    ply = out / f"{scene}.ply"
    assert ply.is_file() and (out / f"{scene}.png").is_file()
    assert_ply_from(ply, shipped_decoder()[0], store, scene)


def test_explicit_checkpoint_wins_over_the_shipped_decoder(reconstructed, tmp_path):
    out, _, _ = reconstructed
    store, scene = scene_of(out)
    checkpoint = tmp_path / "other.safetensors"
    checkpoint.write_bytes(decoder_bytes(seed=1))
    ply = tmp_path / "scene.ply"
    result = invoke("export-ply", scene, "--store", str(store.url), "--out", str(ply), "--checkpoint", str(checkpoint))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == f"decoder: checkpoint {checkpoint}"
    model, _ = load_decoder(store, checkpoint)
    assert_ply_from(ply, model, store, scene)
    shipped_means = decode_scene(shipped_decoder()[0], store, scene)[0].means
    assert not torch.allclose(Gaussians.from_ply(ply).means[: len(shipped_means)], shipped_means)


def test_store_training_wins_over_the_shipped_decoder(reconstructed, tmp_path):
    out, _, _ = reconstructed
    path = Path(shutil.copytree(out / "store", tmp_path / "store"))
    store = RunStore(path, create=False)
    rel = "train/decoder-test/checkpoints/step-00000005/model.safetensors"
    store.write_file(rel, decoder_bytes(seed=2))
    store.write_file(LATEST, json.dumps({"run": "decoder-test", "step": 5, "checkpoint": rel}).encode())
    lines: list[str] = []
    scene = store.scene_ids()[0]
    res = export_scene(str(path), scene, tmp_path / "scene.ply", strip=False, log=lines.append)
    assert lines == [f"decoder: newest training in store {store.url}: decoder-test step 5 ({LATEST})"]
    assert res.decoder == lines[0].removeprefix("decoder: ")
    trained, _ = load_decoder(store, None)
    assert_ply_from(res.ply, trained, store, scene)


def test_viewer_resolves_the_shipped_decoder(reconstructed):
    from lyra_pipeline.viewer import scene_content

    store, scene = scene_of(reconstructed[0])
    lines: list[str] = []
    gaussians, points, note = scene_content(store, scene, store.list_arrays(scene), None, lines.append)
    assert gaussians is not None and points is None
    assert lines[0].startswith(SHIPPED_LOG) and "shipped package decoder" in note


def test_missing_shipped_decoder_is_one_clear_line(shipped, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "decoder"
    monkeypatch.setattr(shipped_mod, "SHIPPED_DECODER", missing)
    with pytest.raises(LyraConfigError, match="shipped decoder folder missing"):
        shipped_decoder()
    out = tmp_path / "R"
    result = invoke("reconstruct", "--image", str(synthetic_image(tmp_path / "room.png")), "--preset", "smoke",
                    "--out", str(out), "--store", str(tmp_path / "lyra_store"))
    assert result.exit_code == 2 and not isinstance(result.exception, LyraConfigError)
    lines = error_lines(result.output)
    assert len(lines) == 1 and str(missing) in lines[0] and "--checkpoint" in lines[0], result.output
    assert not out.exists()


def test_export_of_an_unknown_scene_names_the_scene_not_the_decoder(smoke_store, tmp_path, monkeypatch):
    """No training in the store and no shipped decoder: the unknown scene is what the one line names."""
    monkeypatch.setattr(shipped_mod, "SHIPPED_DECODER", tmp_path / "nowhere" / "decoder")
    result = invoke("export-ply", "nosuchscene", "--store", str(smoke_store), "--out", str(tmp_path / "x.ply"))
    assert result.exit_code == 2
    lines = error_lines(result.output)
    assert len(lines) == 1 and "'nosuchscene'" in lines[0] and "decoder" not in lines[0], result.output
    assert not (tmp_path / "x.ply").exists()


def test_missing_shipped_model_file_names_it(tmp_path, monkeypatch):
    root = write_shipped(tmp_path / "decoder")
    (root / "model.safetensors").unlink()
    monkeypatch.setattr(shipped_mod, "SHIPPED_DECODER", root)
    with pytest.raises(LyraConfigError, match=r"model\.safetensors: shipped decoder file missing"):
        shipped_decoder()


def test_decoder_json_without_a_required_key_is_refused(tmp_path):
    root = write_shipped(tmp_path / "decoder")
    info = json.loads((root / "decoder.json").read_text())
    del info["held_out"]
    (root / "decoder.json").write_text(json.dumps(info))
    with pytest.raises(LyraConfigError, match="lacks held_out"):
        shipped_decoder_info(root)


@pytest.mark.parametrize("case", ["missing image", "garbage checkpoint"])
def test_bad_inputs_are_one_line_and_write_nothing(shipped, tmp_path, case):
    image = synthetic_image(tmp_path / "room.png")
    args = ["reconstruct", "--image", str(image), "--preset", "smoke", "--out", str(tmp_path / "R")]
    if case == "missing image":
        args[2] = str(tmp_path / "absent.png")
        expected = "image not found"
    else:
        (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
        args += ["--checkpoint", str(tmp_path / "bad.safetensors")]
        expected = "not a readable safetensors decoder checkpoint"  # no fallback to the shipped decoder
    result = invoke(*args)
    assert result.exit_code == 2
    lines = error_lines(result.output)
    assert len(lines) == 1 and expected in lines[0], result.output
    assert not (tmp_path / "R").exists()


@pytest.mark.skipif(not (REAL_SHIPPED / "model.safetensors").is_file(), reason="no shipped decoder in this checkout")
def test_the_real_shipped_decoder_loads():
    size = (REAL_SHIPPED / "model.safetensors").stat().st_size
    assert size < 30e6, f"shipped decoder is {size / 1e6:.1f} MB"
    model, source = shipped_decoder(REAL_SHIPPED)
    assert source.startswith("shipped package decoder lyra_pipeline/weights/decoder (trained ")
    assert sum(p.numel() for p in model.parameters()) > 0
    info = shipped_decoder_info(REAL_SHIPPED)
    assert set(INFO_KEYS) <= set(info)


def test_decoder_json_render_settings_apply_and_bad_ones_are_named(tmp_path):
    """decoder.json ``render``: rendering-only settings the shipped decoder is decoded with; a field that would
    change what the weights mean, or a value of the wrong form, is one line naming it."""
    root = write_shipped(tmp_path / "decoder")
    info = json.loads((root / "decoder.json").read_text())
    plain, _ = shipped_decoder(root)
    assert plain.config.input_guard == 0.0
    for render, message in (({"input_guard": 0.5}, None), ({"width": 64}, r"\['width'\]: only \["),
                            ("guard", r"decoder\.json: render: expected an object"),
                            ({"input_guard": -1.0}, r"decoder\.input_guard: expected")):
        (root / "decoder.json").write_text(json.dumps({**info, "render": render}))
        if message is None:
            model, _ = shipped_decoder(root)
            assert model.config.input_guard == 0.5 and not model.training
            for name, value in plain.state_dict().items():
                assert torch.equal(model.state_dict()[name], value)
        else:
            with pytest.raises(LyraConfigError, match=message):
                shipped_decoder(root)
