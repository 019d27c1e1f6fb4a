"""The trained 3DGS decoder shipped with the package (``lyra_pipeline/weights/decoder``).

The folder holds ``model.safetensors`` (the bytes :func:`lyra_pipeline.training.save_checkpoint` writes: the
decoder's weights with its ``DecoderConfig`` in the ``decoder_config`` metadata key) and ``decoder.json`` (how it
was trained: ``config``, ``data_fingerprint``, ``steps``, ``cpu_seconds``, ``held_out``; optional ``render``: the
rendering-only decoder settings it is decoded with, :data:`lyra_ops.decoder.RENDER_FIELDS`, e.g. ``input_guard``).
``lyra reconstruct``, ``lyra export-ply`` and ``lyra view`` use it when neither ``--checkpoint`` nor a finished
``lyra train`` in the store gives a decoder (see :func:`lyra_pipeline.reconstruct.load_decoder`).

Like the tiny teacher (``lyra_pipeline/weights/tiny_teacher``) it is package data, found next to this module;
nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lyra_ops.errors import LyraConfigError

if TYPE_CHECKING:
    from lyra_ops.decoder import LatentGaussianDecoder

PACKAGE_ROOT = Path(__file__).resolve().parent
SHIPPED_DECODER = PACKAGE_ROOT / "weights" / "decoder"
MODEL_FILE = "model.safetensors"
INFO_FILE = "decoder.json"
INFO_KEYS = ("config", "data_fingerprint", "steps", "cpu_seconds", "held_out")


def shipped_decoder_dir() -> Path:
    """The shipped decoder's folder (read at call time, so tests can point ``SHIPPED_DECODER`` elsewhere)."""
    return SHIPPED_DECODER


def display_path(root: Path) -> str:
    """``root`` relative to the folder holding the package (``lyra_pipeline/weights/decoder``), else absolute."""
    try:
        return root.resolve().relative_to(PACKAGE_ROOT.parent).as_posix()
    except ValueError:
        return str(root)


HOW_TO_GET = ("pass --checkpoint model.safetensors or a store with a finished `lyra train`, or reinstall "
              "lyra-pipeline with its package data (pip install .)")


def _required(root: Path, name: str) -> Path:
    """``root/name``; a missing folder or file raises one line naming it and how to get a decoder."""
    if not root.is_dir():
        raise LyraConfigError(f"{root}: shipped decoder folder missing (this install carries no trained decoder); "
                              f"{HOW_TO_GET}")
    path = root / name
    if not path.is_file():
        raise LyraConfigError(f"{path}: shipped decoder file missing; {HOW_TO_GET}")
    return path


def shipped_decoder_info(root: Path | None = None) -> dict[str, Any]:
    """The shipped decoder's ``decoder.json`` (training config, data fingerprint, steps, CPU time, held-out table).

    Raises ``LyraConfigError`` naming the file when it is missing, corrupt or lacks one of ``INFO_KEYS``.
    """
    path = _required(root or shipped_decoder_dir(), INFO_FILE)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LyraConfigError(f"{path}: corrupt shipped decoder description ({exc})") from None
    if not isinstance(info, dict):
        raise LyraConfigError(f"{path}: expected a JSON object, got {type(info).__name__}")
    missing = [k for k in INFO_KEYS if k not in info]
    if missing:
        raise LyraConfigError(f"{path}: shipped decoder description lacks {', '.join(missing)}")
    return info


def scene_count(info: dict[str, Any]) -> int | None:
    """Training scenes recorded in ``decoder.json`` (``train_scenes``: a count or a list of ids), if any."""
    scenes = info.get("train_scenes")
    if isinstance(scenes, bool):
        return None
    if isinstance(scenes, int):
        return scenes
    if isinstance(scenes, list):
        return len(scenes)
    return None


def describe_shipped(root: Path, info: dict[str, Any]) -> str:
    """One phrase for logs: ``shipped package decoder lyra_pipeline/weights/decoder (trained N steps on M
    procedural scenes)``."""
    trained = f"trained {info['steps']} steps"
    scenes = scene_count(info)
    if scenes is not None:
        trained += f" on {scenes} procedural scenes"
    return f"shipped package decoder {display_path(root)} ({trained})"


def shipped_decoder(root: Path | None = None) -> tuple[LatentGaussianDecoder, str]:
    """(decoder in eval mode, description for logs) of the shipped decoder (``root``: another folder of the same
    layout). Missing or unreadable files raise ``LyraConfigError`` naming the file."""
    from lyra_ops.decoder import with_render
    from lyra_pipeline.training import load_decoder_bytes

    root = root or shipped_decoder_dir()
    path = _required(root, MODEL_FILE)
    info = shipped_decoder_info(root)
    model = load_decoder_bytes(path.read_bytes(), str(path))
    render = info.get("render") or {}
    if not isinstance(render, dict):
        raise LyraConfigError(f"{root / INFO_FILE}: render: expected an object of decoder settings, got {render!r}")
    if render:
        model = with_render(model, **render)
    return model, describe_shipped(root, info)
