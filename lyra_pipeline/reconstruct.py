"""From a stored scene (or one image) to 3D Gaussians: decoder inference, standard 3DGS PLY, a fly-through.

``export_scene`` runs a trained decoder on every trajectory of a stored scene (Lyra's inference: all paths as
input views), writes the Gaussians as a standard 3DGS PLY (``gsplat.export_splats``) and a PNG strip rendered
along the trajectories. ``reconstruct_image`` first generates the scene's trajectories from one image (the SDG
stages, in-process) and then exports it. ``splat_transform`` converts a PLY with PlayCanvas's splat-transform
(node) for interoperability checks and its self-contained HTML viewer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from lyra_ops.errors import LyraConfigError, LyraError, LyraInputError
from lyra_ops.gaussians import Gaussians
from lyra_ops.images import to_uint8
from lyra_pipeline.inspect import evenly_spaced
from lyra_pipeline.storage import RunStore
from lyra_pipeline.training import (
    ViewCache,
    index_dataset,
    load_decoder_bytes,
    load_latest_decoder,
    render_view,
    scene_gaussians,
)

SPLAT_TRANSFORM_PACKAGE = "@playcanvas/splat-transform"


@dataclass(frozen=True)
class ExportResult:
    ply: Path
    strip: Path | None
    gaussians: int
    decoder: str
    html: Path | None = None


def load_decoder(store: RunStore, checkpoint: str | Path | None):
    """The decoder from ``checkpoint``: a model.safetensors file, or a store path/URL whose newest finished
    training (``train/latest.json``) is used; None: ``store``'s own newest training."""
    if checkpoint is None:
        return load_latest_decoder(store)
    path = Path(checkpoint)
    if path.is_file():
        return load_decoder_bytes(path.read_bytes(), str(path)), str(path)
    if "://" in str(checkpoint) or (path.is_dir() and (path / "store.json").is_file()):
        return load_latest_decoder(RunStore(str(checkpoint), create=False))
    raise LyraInputError(f"{checkpoint}: decoder checkpoint not found (expected a model.safetensors file or a store "
                         "with a finished `lyra train`)")


def scene_trajectories(store: RunStore, scene_id: str) -> list[str]:
    """Trajectories of a scene whose teacher frames and latents are done."""
    names = index_dataset(store).scenes.get(scene_id, [])
    if not names:
        raise LyraInputError(f"{store.url}: scene {scene_id!r} has no trajectory with finished latents; scenes: "
                             f"{', '.join(store.scene_ids()[:20])}")
    return names


def decode_scene(model, store: RunStore, scene_id: str) -> tuple[Gaussians, ViewCache, list[str]]:
    trajectories = scene_trajectories(store, scene_id)
    views = ViewCache(store, size=len(trajectories))
    return scene_gaussians(model, views, scene_id, trajectories), views, trajectories


def render_strip(gaussians: Gaussians, views: ViewCache, scene_id: str, trajectories: list[str],
                 per_trajectory: int = 4) -> Image.Image:
    """Rows = trajectories, columns = evenly spaced frames: teacher frame above, decoder render below."""
    rows = []
    for name in trajectories:
        view = views.get(scene_id, name)
        render, teacher = render_view(gaussians, view, evenly_spaced(int(view.frames.shape[0]), per_trajectory))
        rows.append(torch.cat([torch.cat(list(teacher), dim=2), torch.cat(list(render), dim=2)], dim=1))
    grid = to_uint8(torch.cat(rows, dim=1)).permute(1, 2, 0).numpy()
    return Image.fromarray(grid)


def export_scene(store_url: str, scene_id: str, out: str | Path, *, checkpoint: str | Path | None = None,
                 html: bool = False, strip: bool = True) -> ExportResult:
    """Decoder Gaussians of a stored scene -> ``out`` (.ply), ``<out>.png`` fly-through strip, optional HTML."""
    out = Path(out)
    if out.suffix.lower() != ".ply":
        raise LyraInputError(f"{out}: the output must be a .ply path")
    store = RunStore(store_url, create=False)
    model, source = load_decoder(store, checkpoint)
    gaussians, views, trajectories = decode_scene(model, store, scene_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    gaussians.to_ply(out)
    strip_path = None
    if strip:
        strip_path = out.with_suffix(".png")
        render_strip(gaussians, views, scene_id, trajectories).save(strip_path)
    html_path = splat_transform(out, out.with_suffix(".html")) if html else None
    return ExportResult(out, strip_path, gaussians.num, source, html_path)


def reconstruct_image(image: str | Path, out_dir: str | Path, *, prompt: str | None = None,
                      checkpoint: str | Path, preset: str = "default", html: bool = False) -> ExportResult:
    """One image -> trajectories -> teacher videos -> latents (SDG stages in-process) -> decoder -> PLY + strip.

    The image and its prompt are copied into ``<out_dir>/input/``; the generated scene goes to
    ``<out_dir>/store``. ``checkpoint``: a model.safetensors file or a store with a finished training. Depth is
    the ``planar`` prior and the teacher the ``warp_only`` baseline (no video or depth model is needed).
    """
    from lyra_pipeline.config import build_config
    from tasks.sdg import SCENE_TASKS, sample_prompts

    image = Path(image)
    if not image.is_file():
        raise LyraInputError(f"{image}: image not found")
    out_dir = Path(out_dir)
    folder = out_dir / "input"
    folder.mkdir(parents=True, exist_ok=True)
    name = image.stem
    shutil.copyfile(image, folder / image.name)
    sidecar = image.with_suffix(".txt")
    text = prompt if prompt is not None else (sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file()
                                               else name.replace("_", " "))
    (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    store = str(out_dir / "store")
    config = build_config(preset, {"scenes": {"source": "images", "images_dir": str(folder.resolve()),
                                              "num_scenes": 1},
                                   "depth": {"backend": "planar"}, "generator": {"backend": "warp_only"}},
                          source="reconstruct")
    scenes = sample_prompts.fn(store, config)
    for scene in scenes:
        for task in SCENE_TASKS.values():
            task.fn(store, config, scene, "reconstruct")
    return export_scene(store, scenes[0].scene_id, out_dir / f"{scenes[0].scene_id}.ply", checkpoint=checkpoint,
                        html=html)


# ------------------------------------------------------------------------------------------------------------
# PlayCanvas splat-transform (node)
# ------------------------------------------------------------------------------------------------------------


def splat_transform_command() -> list[str] | None:
    """How to call splat-transform: ``$LYRA_SPLAT_TRANSFORM``, a ``splat-transform`` on PATH, or ``npx``."""
    explicit = os.environ.get("LYRA_SPLAT_TRANSFORM")
    if explicit:
        return explicit.split()
    found = shutil.which("splat-transform")
    if found:
        return [found]
    if shutil.which("npx") and shutil.which("node"):
        return ["npx", "--yes", SPLAT_TRANSFORM_PACKAGE]
    return None


def splat_transform(src: Path, dst: Path, *extra: str, timeout: float = 600) -> Path:
    """Convert ``src`` to ``dst`` (format from the extension: .csv, .html, .sog, .splat, ...)."""
    cmd = splat_transform_command()
    if cmd is None:
        raise LyraConfigError("splat-transform needs node and npm (npx) or LYRA_SPLAT_TRANSFORM; install Node 20+")
    proc = subprocess.run([*cmd, "-w", *extra, str(src), str(dst)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0 or not dst.exists():
        raise LyraError(f"splat-transform {src} -> {dst} failed ({proc.returncode}): "
                        f"{(proc.stderr or proc.stdout)[-2000:]}")
    return dst
