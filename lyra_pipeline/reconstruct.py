"""From a stored scene (or one image) to 3D Gaussians: decoder inference, standard 3DGS PLY, a fly-through.

``export_scene`` runs a trained decoder on every trajectory of a stored scene (Lyra's inference: all paths as
input views), writes the Gaussians as a standard 3DGS PLY (``gsplat.export_splats``) and a PNG strip rendered
along the trajectories. ``reconstruct_image`` first generates the scene's trajectories from one image (the SDG
stages, in-process) and then exports it. ``splat_transform`` converts a PLY with PlayCanvas's splat-transform
(node) for interoperability checks and its self-contained HTML viewer.

Which decoder (:func:`load_decoder`): an explicit checkpoint wins; else the store's newest finished
``lyra train`` (``train/latest.json``); else the decoder shipped with the package (``lyra_pipeline.shipped``).
"""

from __future__ import annotations

import base64
import hashlib
import html as html_text
import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from lyra_ops.decoder import LatentGaussianDecoder, with_time_frames
from lyra_ops.distill import RENDER_FAR, background_color
from lyra_ops.errors import LyraConfigError, LyraError, LyraInputError
from lyra_ops.gaussians import PLY_LAYOUTS, Gaussians, backdrop_gaussians, backdrop_radius
from lyra_ops.images import to_uint8
from lyra_pipeline.inspect import evenly_spaced
from lyra_pipeline.shipped import shipped_decoder
from lyra_pipeline.storage import RunStore
from lyra_pipeline.training import (
    INPUT_TIMES,
    LATEST,
    ViewCache,
    dynamic_inputs,
    is_dynamic_scene,
    load_decoder_bytes,
    load_latest_decoder,
    render_view,
    scene_gaussians,
    scene_gaussians_at,
    scene_trajectories,
)

if TYPE_CHECKING:
    from lyra_pipeline.config import RunConfig
    from lyra_pipeline.refine import RefineConfig

SPLAT_TRANSFORM_PACKAGE = "@playcanvas/splat-transform"

Log = Callable[[str], None]


@dataclass(frozen=True)
class ExportResult:
    ply: Path
    strip: Path | None
    gaussians: int
    decoder: str
    html: Path | None = None
    backdrop: int = 0  # how many of ``gaussians`` form the backdrop (ExportOptions.backdrop)
    fallbacks: tuple[str, ...] = ()  # one line per stand-in that made the scene (:func:`scene_fallbacks`)
    settings: Path | None = None  # the HTML viewer's settings (<stem>.viewer.json)
    notes: tuple[str, ...] = field(default_factory=tuple)  # what was reused (reconstruct)
    camera: dict | None = None  # the input camera (c2w, K, height, width): where `lyra view <ply>` opens

    @property
    def files(self) -> list[Path]:
        """Every file the export wrote."""
        return [p for p in (self.ply, self.strip, self.settings, self.html) if p is not None]


# ------------------------------------------------------------------------------------------------------------
# Stand-ins: what made a scene when no depth or video model did (said where it happens, in the summary, in the
# export's sidecar JSON and the HTML viewer's title)
# ------------------------------------------------------------------------------------------------------------

DEPTH_ADVICE = ("set depth.backend: transformers with a local model folder, or put NAME.depth.npy beside the image, "
                "or pass --depth FILE")
GENERATOR_ADVICE = ("configure a local video model (generator.backend: diffusers or tiny in --config FILE; README "
                    "\"Real checkpoints\")")
DEPTH_PRIORS = {"planar": "planar prior", "constant": "constant plane"}
# the labels the depth stage stores (lyra_ops.depth) -> backend
DEPTH_PRIOR_LABELS = {"ground-plane prior": "planar", "constant plane": "constant"}


def depth_fallback(backend: str) -> str | None:
    """One line when ``backend`` is a depth prior (no depth model), else None."""
    if backend not in DEPTH_PRIORS:
        return None
    return f"depth: {DEPTH_PRIORS[backend]}: the same geometry for every image; {DEPTH_ADVICE}"


def generator_fallback(backend: str) -> str | None:
    """One line when ``backend`` is the ``warp_only`` baseline (no video model), else None."""
    if backend != "warp_only":
        return None
    return ("generator: warp_only: what the image does not show is filled by push-pull, not generated; "
            f"{GENERATOR_ADVICE}")


def config_fallbacks(config: RunConfig) -> list[str]:
    """The stand-in lines of a scene config (one per fallback: depth prior, warp_only teacher)."""
    return [line for line in (depth_fallback(config.depth.backend), generator_fallback(config.generator.backend))
            if line is not None]


def scene_teacher(store: RunStore, scene_id: str, trajectories: list[str]) -> str | None:
    """The generator that made a stored scene's teacher frames (the ``generator`` attribute the generate stage
    records), None when unrecorded; several: joined with '+'."""
    names = set()
    for name in trajectories:
        try:
            names.add(str(store.scene_group(scene_id)[f"trajectories/{name}/teacher/rgb"].attrs["generator"]))
        except Exception:  # noqa: BLE001 - an older store or another layout: unknown, never an error
            continue
    return "+".join(sorted(names)) or None


def scene_fallbacks(store: RunStore, scene_id: str, trajectories: list[str]) -> list[str]:
    """The stand-in lines of a stored scene, from what its stages recorded (the depth's label, the teacher's
    generator)."""
    lines = []
    try:
        label = str(store.scene_group(scene_id)["depth/depth"].attrs.get("label", ""))
    except Exception:  # noqa: BLE001 - no first-frame depth array (e.g. a dynamic scene): nothing to say
        label = ""
    for prefix, backend in DEPTH_PRIOR_LABELS.items():
        if label.startswith(prefix):
            lines.append(depth_fallback(backend))
    teacher = scene_teacher(store, scene_id, trajectories) or ""
    if "warp_only" in teacher.split("+"):
        lines.append(generator_fallback("warp_only"))
    return lines


def fallback_summary(lines: list[str] | tuple[str, ...]) -> str:
    """'depth planar prior, generator warp_only' from the stand-in lines ('' for none)."""
    return ", ".join(" ".join(part.strip() for part in line.split(":")[:2]) for line in lines)


def teacher_phrase(teacher: str | None) -> str:
    """What refinement PSNR is measured against, for the summary line."""
    if teacher == "warp_only":
        return "the warp_only re-projections (not ground truth)"
    if teacher == "oracle":
        return "the oracle's exact renders"
    if teacher:
        return f"the {teacher} teacher frames (generated, not ground truth)"
    return "the teacher frames (not ground truth)"


def trained_decoder(store: RunStore) -> tuple[LatentGaussianDecoder, str]:
    """The decoder of ``store``'s newest finished training (raises ``LyraStorageError`` when it has none)."""
    model, run = load_latest_decoder(store)
    return model, f"newest training in store {store.url}: {run} ({LATEST})"


def checkpoint_decoder(checkpoint: str | Path) -> tuple[LatentGaussianDecoder, str]:
    """The decoder of an explicit ``--checkpoint``: a model.safetensors file, or a store path/URL whose newest
    finished training is used."""
    path = Path(checkpoint)
    if path.is_file():
        return load_decoder_bytes(path.read_bytes(), str(path)), f"checkpoint {path}"
    if "://" in str(checkpoint) or (path.is_dir() and (path / "store.json").is_file()):
        return trained_decoder(RunStore(str(checkpoint), create=False))
    raise LyraInputError(f"{checkpoint}: decoder checkpoint not found (expected a model.safetensors file or a store "
                         "with a finished `lyra train`)")


def finished_training(store: RunStore | str | None) -> RunStore | None:
    """``store`` opened when it holds a finished training (``train/latest.json``), else None. A local path that is
    not a lyra store (e.g. the default ``./lyra_store`` on a fresh install) counts as none."""
    if store is None:
        return None
    if not isinstance(store, RunStore):
        if "://" not in str(store) and not (Path(store) / "store.json").is_file():
            return None
        store = RunStore(str(store), create=False)
    return store if store.read_file(LATEST) is not None else None


def load_decoder(store: RunStore | str | None, checkpoint: str | Path | None) -> tuple[LatentGaussianDecoder, str]:
    """(decoder, description of where it came from). Resolution: ``checkpoint`` (a model.safetensors file or a
    store path/URL with a finished training) wins; else ``store``'s newest finished training; else the shipped
    package decoder. A bad explicit checkpoint raises; it never falls back."""
    if checkpoint is not None:
        return checkpoint_decoder(checkpoint)
    trained = finished_training(store)
    if trained is not None:
        return trained_decoder(trained)
    return shipped_decoder()


def resolve_decoder(store: RunStore | str | None, checkpoint: str | Path | None,
                    log: Log | None = None, dynamic: bool = False) -> tuple[LatentGaussianDecoder, str]:
    """:func:`load_decoder`, then ``log("decoder: <description>")``. ``dynamic``: for a dynamic scene, where a
    decoder without time embedding (a static one) is used at each time step with the other keyframes' Gaussians
    too (``time_frames: query+keyframes``: +0.6 dB at held-out cameras over the query frame alone,
    ``benchmarks/results/dynamic_quality.json``)."""
    model, source = load_decoder(store, checkpoint)
    if dynamic and not model.config.time_embedding and model.config.time_frames == "query":
        model = with_time_frames(model, "query+keyframes")
        source += ", applied per time step with the other keyframes' Gaussians"
    if log is not None:
        log(f"decoder: {source}")
    return model, source


def decode_scene(model, store: RunStore, scene_id: str) -> tuple[Gaussians, ViewCache, list[str]]:
    trajectories = scene_trajectories(store, scene_id)
    views = ViewCache(store, size=len(trajectories))
    return scene_gaussians(model, views, scene_id, trajectories), views, trajectories


def render_strip(gaussians: Gaussians, views: ViewCache, scene_id: str, trajectories: list[str],
                 per_trajectory: int = 4, background: str = "white") -> Image.Image:
    """Rows = trajectories, columns = evenly spaced frames: teacher frame above, decoder render below (over
    ``background``, the decoder's ``DecoderConfig.background``)."""
    rows = []
    for name in trajectories:
        view = views.get(scene_id, name)
        render, teacher = render_view(gaussians, view, evenly_spaced(int(view.frames.shape[0]), per_trajectory),
                                      background=background)
        rows.append(torch.cat([torch.cat(list(teacher), dim=2), torch.cat(list(render), dim=2)], dim=1))
    grid = to_uint8(torch.cat(rows, dim=1)).permute(1, 2, 0).numpy()
    return Image.fromarray(grid)


# Measured on held-out scene proc-000015 (issue 14): the PlayCanvas viewer at 4x the input resolution showed the
# decoder's per-pixel input Gaussians (0.2 px wide) as a washed-out, gappy fog over the background; widened by
# 0.2 or 0.3 px^2, walls, floor and objects showed solid (neighbours 4 px apart close up once
# 16 (s^2 + v) + 0.3 >= 4, i.e. v >= 0.21 - 0.3 / 16). The price, in our renderer at the input resolution:
# path PSNR 24.74 -> 23.72 / 22.86 / 22.18 dB at v = 0.1 / 0.2 / 0.3.
EXPORT_SMOOTHING = 0.0
# Issue 27 (benchmarks/bench_viewer.py, viewer_quality*.json, 6 held-out scenes): that price is not worth paying in
# the PLY, whose users render it at many sizes: 0.0125 (the filter at a 4x viewer's pixel) already costs 0.49 dB at
# the input camera, a 0.35 px scale floor 2.4 dB and a 2x2 split of the sub-pixel Gaussians 4.8 dB, and none but
# a 0.2 widening removed the dot grid in PlayCanvas at 1280x704 (its screenshot: 25.4 / 20.2 dB at the input /
# novel cameras against the exact render, the raw PLY's 18.0 / 17.5). So the PLY is written as decoded and only the
# copy embedded in the HTML viewer is widened (per-viewer exports).
VIEWER_SMOOTHING = 0.2
# Export backdrops (ExportOptions.backdrop). Measured on 4 held-out default scenes (bench_background.py): the
# shipped decoder's export, 0.991 opaque on average, scored 25.45 dB over its training background (the input's
# mean colour) but 24.69 over white and 25.34 over PlayCanvas's grey; with the backdrop, the same over all three.
BACKDROPS = ("auto", "none")


@dataclass(frozen=True)
class ExportOptions:
    """What an export keeps and how it writes it: Gaussians with opacity >= ``min_opacity``, then without the
    least opaque ``prune_ratio`` of them (Lyra's pruning); each widened by ``smoothing`` px^2 of the input camera
    (:meth:`lyra_ops.gaussians.Gaussians.smoothed`, Mip-Splatting's 3D filter; 0: as decoded), and those
    embedded in the HTML viewer by ``viewer_smoothing`` (its window is several times the data's size); the PLY
    ``layout``
    (``compact`` or ``inria``, :data:`lyra_ops.gaussians.PLY_LAYOUTS`); ``backdrop`` (:data:`BACKDROPS`):
    ``auto`` adds, behind the scene, an opaque sphere of the colour the Gaussians were trained over (a decoder's
    background; none for refinements, which train over random colours and are opaque by themselves), so any
    viewer shows what training composited; ``none`` writes the scene's Gaussians only. Checked on construction,
    before anything is written."""

    prune_ratio: float = 0.0
    min_opacity: float = 0.0
    layout: str = "compact"
    smoothing: float = EXPORT_SMOOTHING
    backdrop: str = "auto"
    viewer_smoothing: float = VIEWER_SMOOTHING

    def __post_init__(self) -> None:
        for name in ("prune_ratio", "min_opacity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise LyraInputError(f"--{name.replace('_', '-')}: expected a number in [0, 1), got {value!r}")
        for name in ("smoothing", "viewer_smoothing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 4.0:
                raise LyraInputError(f"--{name.replace('_', '-')}: expected a number of squared input pixels in "
                                     f"[0, 4], got {value!r}")
        if self.layout not in PLY_LAYOUTS:
            raise LyraInputError(f"--layout: expected one of {', '.join(PLY_LAYOUTS)}, got {self.layout!r}")
        if self.backdrop not in BACKDROPS:
            raise LyraInputError(f"--backdrop: expected one of {', '.join(BACKDROPS)}, got {self.backdrop!r}")


def export_scene(store_url: str, scene_id: str, out: str | Path, *, checkpoint: str | Path | None = None,
                 html: bool = False, strip: bool = True, log: Log | None = None,
                 options: ExportOptions | None = None) -> ExportResult:
    """Decoder Gaussians of a stored scene -> ``out`` (.ply), ``<out>.png`` fly-through strip, optional HTML.

    The decoder: ``checkpoint``, else the store's newest finished training, else the shipped one; ``log`` gets
    one ``decoder: ...`` line saying which. ``options``: what is kept and the PLY layout (the strip and the
    viewer show what the PLY holds)."""
    out = _ply_path(out)
    store = RunStore(store_url, create=False)
    scene_trajectories(store, scene_id)  # an unknown scene is named before any decoder is looked for
    if is_dynamic_scene(store, scene_id):
        raise LyraInputError(f"scene {scene_id!r} is dynamic (a moving scene has no single PLY): export its Gaussian "
                             "sequence with --times all, or one time step with e.g. --times 0")
    model, source = resolve_decoder(store, checkpoint, log)
    return write_scene(model, source, store, scene_id, out, html=html, strip=strip, options=options)


def _ply_path(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".ply":
        raise LyraInputError(f"{out}: the output must be a .ply path")
    return out


def write_scene(model: LatentGaussianDecoder, source: str, store: RunStore, scene_id: str, out: Path, *,
                html: bool = False, strip: bool = True, options: ExportOptions | None = None) -> ExportResult:
    """Decode ``scene_id`` with ``model`` and write the PLY (+ strip, + HTML) of the Gaussians ``options`` keep."""
    gaussians, views, trajectories = decode_scene(model, store, scene_id)
    return write_gaussians(gaussians, source, views, scene_id, trajectories, out, background=model.config.background,
                           trained_over=model.config.background, html=html, strip=strip, options=options,
                           fallbacks=scene_fallbacks(store, scene_id, trajectories))


def with_backdrop(gaussians: Gaussians, centre: torch.Tensor, colour: torch.Tensor | None) -> Gaussians:
    """``gaussians`` and, behind them, an opaque sphere of ``colour`` (None: white) around ``centre`` (the input
    camera), beyond every Gaussian and inside the renderers' far plane (:func:`lyra_ops.gaussians.backdrop_radius`)."""
    colour = torch.ones(3) if colour is None else colour
    radius = backdrop_radius(gaussians, centre, far=RENDER_FAR)
    return Gaussians.cat([gaussians, backdrop_gaussians(centre, radius, colour).to(gaussians.device)])


def export_ready(gaussians: Gaussians, options: ExportOptions, cameras, frame: int, rgb: torch.Tensor,
                 trained_over: str | None, smoothing: float | None = None) -> tuple[Gaussians, int]:
    """What an export writes of ``gaussians``: those ``options`` keep, smoothed for camera ``frame`` of ``cameras``
    (the input camera), then, with ``options.backdrop`` ``auto`` and a ``trained_over`` background, the backdrop
    of that background's colour (``rgb``: the input frame (3,H,W) it is taken from) around that camera; and how
    many of the result form the backdrop. ``smoothing``: instead of ``options.smoothing`` (the viewer's copy)."""
    g = gaussians.select_for_export(options.prune_ratio, options.min_opacity)
    centre = cameras.c2w[frame, :3, 3]
    g = g.smoothed(centre, float(cameras.K[frame, 0, 0]), options.smoothing if smoothing is None else smoothing)
    if options.backdrop != "auto" or trained_over is None:
        return g, 0
    with_bd = with_backdrop(g, centre, background_color(rgb, trained_over))
    return with_bd, with_bd.num - g.num


def write_gaussians(gaussians: Gaussians, source: str, views: ViewCache, scene_id: str, trajectories: list[str],
                    out: Path, *, background: str = "input_mean", trained_over: str | None = None,
                    html: bool = False, strip: bool = True, options: ExportOptions | None = None,
                    fallbacks: list[str] | tuple[str, ...] = ()) -> ExportResult:
    """Write the Gaussians ``options`` keep as a PLY at ``out`` (+ the strip along the scene's trajectories, + the
    HTML viewer opening at the input camera over ``background``: ``white`` or ``input_mean``). ``trained_over``:
    the background the Gaussians were fitted over (:data:`lyra_ops.decoder.BACKGROUNDS`), baked in as a backdrop
    when ``options.backdrop`` is ``auto``; None (random backgrounds): no backdrop. ``fallbacks``: the scene's
    stand-in lines (:func:`scene_fallbacks`), named in the HTML viewer's title."""
    options = options or ExportOptions()
    first = views.get(scene_id, trajectories[0])
    decoded = gaussians
    gaussians, backdrop = export_ready(decoded, options, first.cameras, 0, first.frames[0], trained_over)
    out.parent.mkdir(parents=True, exist_ok=True)
    gaussians.to_ply(out, layout=options.layout)
    strip_path = None
    if strip:
        strip_path = out.with_suffix(".png")
        render_strip(gaussians, views, scene_id, trajectories, background=background).save(strip_path)
    html_path = None
    if html:
        colour = background_color(first.frames[0], background)
        settings = viewer_settings(first.cameras.c2w[0], first.cameras.K[0], first.cameras.height,
                                   first.cameras.width,
                                   tuple(colour.tolist()) if colour is not None else (1.0, 1.0, 1.0))
        settings_path = out.with_suffix(".viewer.json")
        settings_path.write_text(json.dumps(settings, indent=1))
        shown = out
        if options.viewer_smoothing != options.smoothing:  # the viewer's own copy, widened for its large window
            shown = out.with_name(out.stem + ".viewer.partial.ply")
            viewer_g, _ = export_ready(decoded, options, first.cameras, 0, first.frames[0], trained_over,
                                       smoothing=options.viewer_smoothing)
            viewer_g.to_ply(shown, layout=options.layout)
        try:
            html_path = write_viewer_html(shown, out.with_suffix(".html"), settings_path,
                                          viewer_title(scene_id, out, fallbacks))
        finally:
            if shown != out:
                shown.unlink(missing_ok=True)
    return ExportResult(out, strip_path, gaussians.num, source, html_path, backdrop, tuple(fallbacks),
                        out.with_suffix(".viewer.json") if html else None,
                        camera=camera_record(first.cameras.c2w[0], first.cameras.K[0], first.cameras.height,
                                             first.cameras.width))


def camera_record(c2w: torch.Tensor, K: torch.Tensor, height: int, width: int) -> dict:
    """The input camera as the export sidecar records it (``lyra view <ply>`` opens there, with its field of
    view): lists of floats rounded to 7 significant digits (the same bytes on every run)."""
    def rounded(t: torch.Tensor) -> list:
        return [[float(f"{float(v):.7g}") for v in row] for row in t.double().tolist()]

    return {"c2w": rounded(c2w), "K": rounded(K), "height": int(height), "width": int(width)}


def export_refined(store: RunStore, scene_id: str, name: str, out: str | Path, *, html: bool = False,
                   strip: bool = True, options: ExportOptions | None = None) -> ExportResult:
    """The refined Gaussians of refinement ``name`` (``lyra refine``) written like :func:`export_scene`."""
    from lyra_pipeline.refine import load_plan, refined_gaussians
    from lyra_pipeline.threads import pin_torch_threads

    out = _ply_path(out)
    plan, _ = load_plan(store, scene_id, name)
    pin_torch_threads(plan.config.torch_threads)  # the refinement's own count, however this process got here
    gaussians = refined_gaussians(store, scene_id, name)
    views = ViewCache(store, size=len(plan.trajectories))
    source = f"refined {plan.config.steps} steps from {plan.init} ({name})"
    trained_over = None if plan.config.background == "random" else plan.config.background
    return write_gaussians(gaussians, source, views, scene_id, plan.trajectories, out, trained_over=trained_over,
                           html=html, strip=strip, options=options,
                           fallbacks=scene_fallbacks(store, scene_id, plan.trajectories))


@dataclass(frozen=True)
class SequenceResult:
    index: Path  # <stem>.sequence.json
    plys: list[Path]
    strip: Path | None
    gaussians: list[int]
    decoder: str
    backdrop: int = 0  # how many of each step's Gaussians form the backdrop (ExportOptions.backdrop)
    fallbacks: tuple[str, ...] = ()

    @property
    def files(self) -> list[Path]:
        return [*self.plys, self.index, *([self.strip] if self.strip else [])]


def parse_frames(text: str, count: int) -> list[int]:
    """``--times``: ``all``, or comma-separated input frame indices in [0, count - 1] (one clear error else)."""
    if text.strip().lower() == "all":
        return list(range(count))
    try:
        frames = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        frames = []
    if not frames or any(not 0 <= f < count for f in frames) or len(set(frames)) != len(frames):
        raise LyraInputError(f"--times {text!r}: expected 'all' or distinct frame indices in [0, {count - 1}] "
                             "separated by commas, e.g. 0,12,24")
    return sorted(frames)


def decode_sequence(model: LatentGaussianDecoder, store: RunStore, scene_id: str,
                    frames: list[int]) -> tuple[list[Gaussians], ViewCache, torch.Tensor]:
    """A dynamic scene's Gaussians at each input frame of ``frames`` (time-conditioned decoding), its views and
    the input video's normalised times."""
    forward = dynamic_inputs(store, scene_id)
    views = ViewCache(store, size=len(forward) + 2)
    _, times = views.input_view(scene_id)
    return [scene_gaussians_at(model, views, scene_id, forward, f) for f in frames], views, times


def export_sequence(store_url: str, scene_id: str, out: str | Path, *, times: str = "all",
                    checkpoint: str | Path | None = None, strip: bool = True, log: Log | None = None,
                    options: ExportOptions | None = None, fps: float = 8.0) -> SequenceResult:
    """A dynamic scene as a Gaussian sequence: one PLY per query frame, ``<stem>_<frame:04d>.ply`` beside ``out``
    (the numbered names SuperSplat plays as an animation when the files or their folder are dropped on it), an
    index ``<stem>.sequence.json`` (frame, normalised time, file, Gaussians per step; ``lyra view`` plays it with a
    time slider) and ``<stem>_sequence.png``: the input video (top) above the Gaussians rendered from the input
    camera at the same times (bottom). Everything is validated before anything is written."""
    out = _ply_path(out)
    store = RunStore(store_url, create=False)
    scene_trajectories(store, scene_id)
    if not is_dynamic_scene(store, scene_id):
        raise LyraInputError(f"scene {scene_id!r} is static (no input video): export it without --times")
    count = len(store.read_array(scene_id, INPUT_TIMES))
    frames = parse_frames(times, count)
    options = options or ExportOptions()
    model, source = resolve_decoder(store, checkpoint, log, dynamic=True)
    sequence, views, stamps = decode_sequence(model, store, scene_id, frames)
    input_view, _ = views.input_view(scene_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    entries, plys, kept, backdrop = [], [], [], 0
    for frame, gaussians in zip(frames, sequence, strict=True):
        g, backdrop = export_ready(gaussians, options, input_view.cameras, frame, input_view.frames[frame],
                                   model.config.background)
        path = out.with_name(f"{out.stem}_{frame:04d}.ply")
        g.to_ply(path, layout=options.layout)
        plys.append(path)
        kept.append(g)
        entries.append({"frame": frame, "time": float(stamps[frame]), "file": path.name, "gaussians": g.num,
                        "backdrop": backdrop})
    fallbacks = scene_fallbacks(store, scene_id, scene_trajectories(store, scene_id))
    index = out.with_name(f"{out.stem}.sequence.json")
    index.write_text(json.dumps({"scene": scene_id, "decoder": source, "fps": fps, "layout": options.layout,
                                 "made_with": fallbacks, "frames": entries}, indent=1))
    strip_path = None
    if strip:
        strip_path = out.with_name(f"{out.stem}_sequence.png")
        sequence_strip(kept, frames, input_view, model.config.background).save(strip_path)
    return SequenceResult(index, plys, strip_path, [e["gaussians"] for e in entries], source, backdrop,
                          tuple(fallbacks))


def sequence_strip(sequence: list[Gaussians], frames: list[int], input_view, background: str = "input_mean",
                   columns: int = 6) -> Image.Image:
    """Top: the input video at up to ``columns`` evenly spaced query frames; bottom: the Gaussians of those
    frames rendered from the input camera at that frame (over the decoder's background)."""
    from lyra_pipeline.quality import render_gaussians

    picks = evenly_spaced(len(frames), min(columns, len(frames)))
    top, bottom = [], []
    cams = input_view.cameras
    for i in picks:
        f = frames[i]
        frame = input_view.frames[f].float() / 255.0
        bg = background_color(input_view.frames[f], background)
        render = render_gaussians(sequence[i], cams[torch.tensor([f])], background=bg).rgb[0]
        top.append(frame)
        bottom.append(render)
    grid = torch.cat([torch.cat(top, dim=2), torch.cat(bottom, dim=2)], dim=1)
    return Image.fromarray(to_uint8(grid).permute(1, 2, 0).numpy())


def viewer_settings(c2w: torch.Tensor, K: torch.Tensor, height: int, width: int,
                    background: tuple[float, float, float]) -> dict:
    """PlayCanvas SuperSplat viewer settings (splat-transform ``-E``) that open the scene at the input camera:
    its position, a target one unit along its optical axis (+z, OpenCV), its field of view along the frame's
    longer side (the viewer applies ``fov`` to the window's longer side: measured, a landscape window framed
    the input view as our render does with the horizontal field of view, zoomed in ~1.7x with the vertical
    one), and the decoder's background colour. (Open the HTML with ``?noanim`` to stay there: by default the
    viewer starts a gentle figure-8 flight around that camera.) The viewer turns the splat 180 degrees about z
    (splat-transform 2.7.1: ``entity.setLocalEulerAngles(0, 0, 180)``, OpenCV's y-down to its y-up), so positions
    and directions are given as (-x, -y, z) (measured with bench_viewer.py at cameras off the origin)."""
    flip = torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)  # the viewer turns the splat 180 degrees about z
    position = c2w[:3, 3].double() * flip
    target = position + c2w[:3, 2].double() * flip
    side, focal = (width, float(K[0, 0])) if width >= height else (height, float(K[1, 1]))
    fov = math.degrees(2.0 * math.atan(side / (2.0 * focal)))
    return {
        "version": 2, "tonemapping": "none", "highPrecisionRendering": False,
        "background": {"color": [round(float(c), 4) for c in background]},
        "postEffectSettings": {
            "sharpness": {"enabled": False, "amount": 0}, "bloom": {"enabled": False, "intensity": 1, "blurLevel": 2},
            "grading": {"enabled": False, "brightness": 0, "contrast": 1, "saturation": 1, "tint": [1, 1, 1]},
            "vignette": {"enabled": False, "intensity": 0.5, "inner": 0.3, "outer": 0.75, "curvature": 1},
            "fringing": {"enabled": False, "intensity": 0.5},
        },
        "animTracks": [],
        "cameras": [{"initial": {"position": [round(float(v), 6) + 0.0 for v in position],  # + 0.0: no -0.0
                                 "target": [round(float(v), 6) + 0.0 for v in target], "fov": round(fov, 3)}}],
        "annotations": [], "startMode": "default",
    }  # fmt: skip


def reconstruct_image(image: str | Path, out_dir: str | Path, *, prompt: str | None = None,
                      checkpoint: str | Path | None = None, store: str | None = None, preset: str = "default",
                      html: bool = False, log: Log | None = None, options: ExportOptions | None = None,
                      refine: RefineConfig | None = None, depth: str | Path | None = None,
                      sections: dict | None = None) -> ExportResult:
    """One image -> trajectories -> teacher videos -> latents (SDG stages in-process) -> decoder -> PLY + strip.

    The image and its prompt are copied into ``<out_dir>/input/``; the generated scene goes to
    ``<out_dir>/store``. The decoder: ``checkpoint`` (a model.safetensors file or a store with a finished
    training), else ``store``'s newest finished training (skipped when it is not a store or has none), else the
    shipped package decoder; it is loaded before anything is written, and ``log`` gets one ``decoder: ...`` line.
    Depth: ``depth`` (a depth map file, :func:`read_depth_file`), else ``NAME.depth.npy`` beside the image, else
    ``sections["depth"]`` (a --config file's ``depth`` section, e.g. a transformers model), else the ``planar``
    prior; the teacher: ``sections["generator"]``, else the ``warp_only`` baseline. Each stand-in (prior,
    baseline) is logged in one line before the scene is generated and named in the summary, the sidecar and the
    HTML title. ``refine``: also optimise the scene's Gaussians against its teacher frames
    (:mod:`lyra_pipeline.refine`, resumable in ``<out_dir>/store``) and export the refined ones instead of the
    decoder's. Content-addressed (:mod:`lyra_pipeline.outputs`): when ``<scene>.export.json`` records the same
    inputs and its files are unchanged, nothing is computed or written (``notes``: ``up to date``).
    """
    from lyra_pipeline.inputs import load_image
    from lyra_pipeline.outputs import depth_beside, output_key, reconstruct_inputs, up_to_date

    image = Path(image)
    if not image.is_file():
        raise LyraInputError(f"{image}: image not found")
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    options = options or ExportOptions()
    depth_path = Path(depth) if depth is not None else depth_beside(image)
    # a bad preset or config section fails here, before anything is written
    config = _scene_config(out_dir / "input", preset, sections=sections, depth_file=depth_path is not None)
    # an unreadable or tiny image is named (the user's path) before anything is written; a crop that keeps
    # little of it is warned here, at the video size
    load_image(image, config.video.height, config.video.width)
    depth_map = read_depth_file(depth_path, *image_size(image)) if depth_path is not None else None
    check_models(config)
    inputs = reconstruct_inputs(image, prompt=prompt, depth=depth, preset=preset, sections=sections,
                                checkpoint=checkpoint, store=store, options=asdict(options),
                                refine=refine_key(refine), html=html)
    key = output_key(inputs) if inputs is not None else None
    done = up_to_date(out_dir / f"{image.stem}.ply", key)
    if done is not None:
        return result_from_sidecar(done, out_dir / f"{image.stem}.ply")
    model, source = resolve_decoder(store, checkpoint, log)
    if log is not None and depth_map is not None:
        log(f"depth: {depth_path} ({depth_map.shape[1]}x{depth_map.shape[0]}, {float(depth_map.min()):.3g} to "
            f"{float(depth_map.max()):.3g} m; cropped and resized to the video frame like the image)")
    _copy_input(image, out_dir / "input", prompt, depth_map)
    return _reconstruct(config, out_dir, model, source, html=html, log=log, options=options, refine=refine,
                        key=key, inputs=inputs)


def refine_key(refine: RefineConfig | None) -> dict | None:
    """A refinement's part of a reconstruct key: ``{"steps": N}`` for ``RefineConfig(steps=N)`` (what
    ``reconstruct --refine N`` asks for; ``torch_threads`` and ``checkpoint_every`` change no result), else every
    field that names a refinement."""
    if refine is None:
        return None
    from lyra_pipeline.refine import RefineConfig

    plain = RefineConfig(steps=refine.steps)
    if replace(refine, torch_threads=None, checkpoint_every=plain.checkpoint_every) == plain:
        return {"steps": refine.steps}
    return {k: v for k, v in asdict(refine).items() if k not in ("torch_threads", "checkpoint_every")}


def export_summary(res: ExportResult) -> str:
    """The export's summary line: what it wrote (the backdrop counted), and the stand-ins that made the scene."""
    files = ", ".join(str(p) for p in (res.strip, res.html) if p is not None)
    count = f"{res.gaussians} Gaussians" + (f", {res.backdrop} of them the backdrop" if res.backdrop else "")
    line = f"wrote {res.ply} ({count})" + (f", {files}" if files else "")
    return line + (f"; fallbacks: {fallback_summary(res.fallbacks)}" if res.fallbacks else "")


def result_from_sidecar(doc: dict, ply: Path) -> ExportResult:
    """The :class:`ExportResult` an up-to-date sidecar records (``notes``: ``up to date``)."""
    r = doc.get("result", {})
    folder = ply.parent

    def path(key: str) -> Path | None:
        return folder / r[key] if r.get(key) else None

    return ExportResult(ply, path("strip"), int(r.get("gaussians", 0)), str(r.get("decoder", "")), path("html"),
                        int(r.get("backdrop", 0)), tuple(doc.get("made_with", ())), path("settings"),
                        ("up to date",), r.get("camera"))


def record_export(res: ExportResult, key: str | None, inputs: dict | None, **extra) -> None:
    """Write ``res``'s sidecar (:func:`lyra_pipeline.outputs.write_sidecar`) with what rebuilds ``res``."""
    from lyra_pipeline.outputs import write_sidecar

    result = {"gaussians": res.gaussians, "backdrop": res.backdrop, "decoder": res.decoder,
              **{k: p.name for k, p in (("strip", res.strip), ("html", res.html), ("settings", res.settings)) if p},
              **({"camera": res.camera} if res.camera is not None else {})}
    write_sidecar(res.ply, key, inputs or {}, res.files, list(res.fallbacks), export_summary(res), result=result,
                  **extra)


# 16-bit PNG depth maps (Kinect, ScanNet, TUM...) hold millimetres; 0 there means "no measurement".
DEPTH_FORMS = ("an (H,W) .npy of metric z-depth in metres (numpy.save) or a 16-bit greyscale PNG of depth in "
               "millimetres")
ASPECT_TOLERANCE = 0.01  # a depth map of another size must have the image's aspect ratio within 1%


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image as it is read (EXIF orientation applied)."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
            w, h = h, w
    return h, w


def read_depth_file(path: Path, height: int, width: int) -> torch.Tensor:
    """``reconstruct --depth FILE``: a metric z-depth map (H,W) float32 in metres, checked against the image
    (``height`` x ``width``) before anything is written. ``.npy``: metres; ``.png``: a 16-bit greyscale PNG in
    millimetres (divided by 1000). Every pixel must be finite and > 0. Size: the image's, or another size of the
    image's aspect ratio (within 1%); it is then cover-cropped and resized (nearest) to the video frame exactly
    as the image is. EXR is refused (no EXR reader is a dependency). One ``LyraInputError`` line otherwise."""
    import numpy as np

    from lyra_ops.depth import check_user_depth

    suffix = path.suffix.lower()
    if not path.is_file():
        raise LyraInputError(f"{path}: --depth file not found; expected {DEPTH_FORMS}")
    if suffix == ".exr":
        raise LyraInputError(f"{path}: --depth EXR is not read (no EXR reader is installed); convert it to "
                             f"{DEPTH_FORMS}")
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
            if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
                raise ValueError("not a numeric array")
        except Exception:  # noqa: BLE001 - numpy's own text may suggest a pickle load: never offered
            raise LyraInputError(f"{path}: --depth is not a valid .npy file of numbers; expected "
                                 f"{DEPTH_FORMS}") from None
        depth = np.asarray(arr, dtype=np.float32)
    elif suffix == ".png":
        try:
            with Image.open(path) as im:
                im.load()
                mode = im.mode
                values = np.asarray(im)
        except Exception:  # noqa: BLE001 - any decoding failure is one line
            raise LyraInputError(f"{path}: --depth cannot be decoded as a PNG; expected {DEPTH_FORMS}") from None
        if mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I") or values.ndim != 2 or values.max(initial=0) > 65535:
            raise LyraInputError(f"{path}: --depth PNG is {mode} with shape {values.shape}; expected a 16-bit "
                                 "greyscale PNG of depth in millimetres (or an .npy in metres)")
        if bool((values == 0).any()):
            raise LyraInputError(f"{path}: --depth PNG has {int((values == 0).sum())} pixels of 0 mm (no "
                                 "measurement); fill them (every pixel must hold a depth) or pass an .npy in metres")
        depth = values.astype(np.float32) / np.float32(1000.0)
    else:
        raise LyraInputError(f"{path}: --depth must end in .npy or .png; expected {DEPTH_FORMS}")
    check_user_depth(torch.from_numpy(np.ascontiguousarray(depth)), source=str(path))
    h, w = depth.shape
    if (h, w) != (height, width) and abs((w / h) / (width / height) - 1.0) > ASPECT_TOLERANCE:
        raise LyraInputError(f"{path}: --depth is {w}x{h} but the image is {width}x{height}; expected the image's "
                             f"size or the same aspect ratio (within {ASPECT_TOLERANCE:.0%}), resized with the image")
    return torch.from_numpy(np.ascontiguousarray(depth))


def check_out_dir(out_dir: Path) -> None:
    """``reconstruct --out``: a folder (created when missing) whose nearest existing ancestor is a folder; one
    ``LyraInputError`` line naming the path else (checked before anything is written)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LyraInputError(f"{out_dir}: --out is an existing file; expected an output folder (new or existing)")
    for parent in out_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LyraInputError(f"{out_dir}: --out is inside {parent}, which is a file; expected an output "
                                     "folder (new or existing)")
            break


from lyra_pipeline.config import TEXT_TO_IMAGE_HELP  # noqa: E402 - one text for here and the CLI's early check


def reconstruct_text(prompt: str, out_dir: str | Path, *, text_to_image: dict | None,
                     checkpoint: str | Path | None = None, store: str | None = None, preset: str = "default",
                     html: bool = False, log: Log | None = None, options: ExportOptions | None = None,
                     refine: RefineConfig | None = None, sections: dict | None = None) -> ExportResult:
    """Text to 3D: ``prompt`` -> the configured text-to-image pipeline's first frame (``text_to_image``: the
    ``TextToImageConfig`` fields, ``model_path`` required) -> the same path as :func:`reconstruct_image`. The
    pipeline folder and the decoder are checked before anything is written; the first frame is also saved as
    ``<out_dir>/input/<scene>.png``. (Not content-addressed: it always runs; finished stages are reused.)"""
    from lyra_pipeline.backends.diffusers_image import inspect_t2i_checkpoint

    if not prompt or not prompt.strip():
        raise LyraInputError("--prompt: expected a non-empty text")
    settings = dict(text_to_image or {})
    if not settings.get("model_path"):
        raise LyraConfigError(f"reconstruct --prompt needs a text-to-image pipeline: {TEXT_TO_IMAGE_HELP}")
    inspect_t2i_checkpoint(settings["model_path"])
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    prompts = out_dir / "input" / "prompt.txt"
    config = _scene_config(out_dir / "input", preset, text={"prompts_file": str(prompts.resolve()),
                                                           "text_to_image": settings}, sections=sections)
    check_models(config)
    model, source = resolve_decoder(store, checkpoint, log)
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text(prompt.strip() + "\n", encoding="utf-8")
    return _reconstruct(config, out_dir, model, source, html=html, log=log, options=options, refine=refine)


def _reconstruct(config: RunConfig, out_dir: Path, model: LatentGaussianDecoder, source: str, *, html: bool,
                 log: Log | None, options: ExportOptions | None, refine: RefineConfig | None,
                 key: str | None = None, inputs: dict | None = None) -> ExportResult:
    """The scene of ``config`` (one image or prompt) generated into ``<out_dir>/store``, decoded (and refined),
    written as ``<out_dir>/<scene>.ply`` with its sidecar (``key``, ``inputs``; none without a key)."""
    from lyra_pipeline.refine import refine_rel, refine_scene_inprocess

    for line in config_fallbacks(config):  # said where it happens: before the scene is made with it
        if log is not None:
            log(line)
    scene_store = str(out_dir / "store")
    scene_id, computed, reused = _generate_scene(config, scene_store)
    if log is not None and computed == 0:
        log(f"scene {scene_id}: all {reused} stage units reused from {scene_store} (made earlier with the same "
            "inputs)")
    run_store = RunStore(scene_store, create=False)
    if config.scenes.source == "text":  # the generated first frame, for the user
        frame = torch.from_numpy(run_store.read_array(scene_id, "input/rgb")).permute(1, 2, 0).numpy()
        Image.fromarray(frame).save(out_dir / "input" / f"{scene_id}.png")
    out = out_dir / f"{scene_id}.ply"
    extra = {}
    if refine is None:
        res = write_scene(model, source, run_store, scene_id, out, html=html, options=options)
    else:
        if refine.torch_threads is None:  # the scene's compute threads, whether or not its stages had work now
            refine = replace(refine, torch_threads=config.compute.torch_threads)
        plan, result = refine_scene_inprocess(run_store, scene_id, refine, model, source, log=log)
        if log is not None:
            log(refine_summary(result, scene_teacher(run_store, scene_id, plan.trajectories)))
        res = export_refined(run_store, scene_id, plan.name, out, html=html, options=options)
        data = run_store.read_file(refine_rel(scene_id, plan.name, "result.json")) or b""
        extra["refinement"] = {"name": plan.name, "result_sha256": hashlib.sha256(data).hexdigest()}
    record_export(res, key, inputs, **extra)
    return res


def refine_summary(result: dict, teacher: str | None = None) -> str:
    """One line: PSNR on the held-out teacher frames before and after a refinement, saying what it is measured
    against (``teacher``: the generator that made the frames, :func:`scene_teacher`)."""
    b, a = result["psnr_before"], result["psnr_after"]
    init = result["init"].split(":")[0]
    return (f"refined {result['scene']} ({result['name']}, {result['steps']} steps from {init}): "
            f"PSNR vs {teacher_phrase(teacher)} on {result['held_out_frames']} teacher frames it did not fit "
            f"{b['input_mean']:.2f} -> {a['input_mean']:.2f} dB (over white {b['white']:.2f} -> {a['white']:.2f}, "
            f"over grey {b['grey']:.2f} -> {a['grey']:.2f}); {result['gaussians_after']} Gaussians")


def _copy_input(image: Path, folder: Path, prompt: str | None, depth: torch.Tensor | None = None) -> None:
    """``image``, its prompt (``prompt``, else IMAGE.txt beside it, else its name) and its depth map (as
    ``NAME.depth.npy``, float32 metres; removed when ``depth`` is None) copied into ``folder``."""
    import numpy as np

    from lyra_pipeline.outputs import image_prompt

    folder.mkdir(parents=True, exist_ok=True)
    name = image.stem
    shutil.copyfile(image, folder / image.name)
    (folder / f"{name}.txt").write_text(image_prompt(image, prompt), encoding="utf-8")
    target = folder / f"{name}.depth.npy"
    if depth is None:
        target.unlink(missing_ok=True)
    else:
        tmp = folder / f"{name}.depth.partial.npy"
        np.save(tmp, depth.numpy().astype(np.float32))
        os.replace(tmp, target)


def _scene_config(folder: Path, preset: str, text: dict | None = None, sections: dict | None = None,
                  depth_file: bool = False) -> RunConfig:
    """The SDG config of one image in ``folder`` (or, with ``text`` = {prompts_file, text_to_image}, one prompt):
    ``preset``'s video format; depth: ``file`` (NAME.depth.npy beside the copied image) with ``depth_file``,
    else ``sections["depth"]``, else the planar prior; teacher: ``sections["generator"]``, else warp-only."""
    from lyra_pipeline.config import build_config

    sections = sections or {}
    depth = {"backend": "planar", **dict(sections.get("depth") or {})}
    if depth_file:
        depth["backend"] = "file"
    elif depth["backend"] == "file":
        raise LyraConfigError("depth.backend file: reconstruct reads NAME.depth.npy beside the image; put it there "
                              "or pass --depth FILE")
    generator = {"backend": "warp_only", **dict(sections.get("generator") or {})}
    scenes = {"source": "images", "images_dir": str(folder.resolve()), "num_scenes": 1}
    extra = {}
    if text is not None:
        scenes = {"source": "text", "prompts_file": text["prompts_file"], "num_scenes": 1}
        extra = {"text_to_image": text["text_to_image"]}
    return build_config(preset, {"scenes": scenes, "depth": depth, "generator": generator, **extra},
                        source="reconstruct")


def check_models(config: RunConfig) -> None:
    """The depth and video model folders a reconstruct config names, checked before anything is written (as
    ``lyra run``'s preflight does)."""
    from lyra_pipeline.planning import check_models as check

    check(config)


def _generate_scene(config: RunConfig, store: str) -> tuple[str, int, int]:
    """The SDG stages, in-process, for the config's one image: its scene id, the units computed and reused."""
    from tasks.sdg import SCENE_TASKS, sample_prompts

    scenes = sample_prompts.fn(store, config)
    computed = reused = 0
    for scene in scenes:
        for task in SCENE_TASKS.values():
            report = task.fn(store, config, scene, "reconstruct")
            computed, reused = computed + report.computed, reused + report.skipped
    return scenes[0].scene_id, computed, reused


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


# The viewer HTML embeds the scene as a base64 ZIP (SOG) whose entries carry splat-transform's wall-clock time
# (measured: two writes of one PLY differed in exactly those 21 base64 characters), so the HTML is made
# reproducible by setting every entry's DOS time to 1980-01-01 00:00 (the earliest DOS time).
_DATA_URI = re.compile(rb"data:application/octet-stream;base64,([A-Za-z0-9+/]+=*)")
_TITLE = re.compile(rb"<title>.*?</title>", re.DOTALL)
ZIP_TIME_DATE = (0).to_bytes(2, "little") + ((1 << 5) | 1).to_bytes(2, "little")  # 00:00:00, 1980-01-01


def zip_fixed_times(data: bytes) -> bytes | None:
    """``data`` (a ZIP archive) with every entry's time and date set to 1980-01-01 00:00, in its central
    directory and its local headers; None when it is not a ZIP this walk understands (left as it is)."""
    buf = bytearray(data)
    eocd = buf.rfind(b"PK\x05\x06")
    if not data.startswith(b"PK\x03\x04") or eocd < 0 or eocd + 22 > len(buf):
        return None
    count = int.from_bytes(buf[eocd + 10 : eocd + 12], "little")
    pos = int.from_bytes(buf[eocd + 16 : eocd + 20], "little")
    for _ in range(count):
        if buf[pos : pos + 4] != b"PK\x01\x02":
            return None
        name, extra, comment = (int.from_bytes(buf[pos + o : pos + o + 2], "little") for o in (28, 30, 32))
        local = int.from_bytes(buf[pos + 42 : pos + 46], "little")
        if buf[local : local + 4] != b"PK\x03\x04":
            return None
        buf[pos + 12 : pos + 16] = ZIP_TIME_DATE
        buf[local + 10 : local + 14] = ZIP_TIME_DATE
        pos += 46 + name + extra + comment
    return bytes(buf)


def reproducible_html(page: bytes, title: str | None = None) -> bytes:
    """A splat-transform viewer page with its embedded ZIPs' entry times fixed (:func:`zip_fixed_times`) and, with
    ``title``, its ``<title>`` replaced: the same PLY and settings give the same bytes."""

    def fix(match: re.Match) -> bytes:
        try:
            data = base64.b64decode(match.group(1), validate=True)
        except ValueError:
            return match.group(0)
        fixed = zip_fixed_times(data)
        return match.group(0) if fixed is None else b"data:application/octet-stream;base64," + base64.b64encode(fixed)

    page = _DATA_URI.sub(fix, page)
    if title is not None:
        page = _TITLE.sub(lambda _: b"<title>" + html_text.escape(title).encode() + b"</title>", page, count=1)
    return page


def viewer_title(scene_id: str, ply: Path, fallbacks: list[str] | tuple[str, ...] = ()) -> str:
    """The HTML viewer's title: the PLY, the scene, and the stand-ins that made it."""
    title = f"{ply.name} · lyra scene {scene_id}"
    return title + (f" · fallbacks: {fallback_summary(fallbacks)}" if fallbacks else "")


def write_viewer_html(ply: Path, html_path: Path, settings: Path, title: str) -> Path:
    """The self-contained HTML viewer of ``ply`` (splat-transform ``-E settings``), made reproducible and titled
    (:func:`reproducible_html`), written in place of ``html_path`` atomically."""
    tmp = html_path.with_name(html_path.stem + ".partial.html")
    try:
        splat_transform(ply, tmp, "-E", str(settings))
        tmp.write_bytes(reproducible_html(tmp.read_bytes(), title))
        os.replace(tmp, html_path)
    finally:
        tmp.unlink(missing_ok=True)
    return html_path


def chromium_path() -> str | None:
    """A Chromium to screenshot HTML viewers with (needs the ``playwright`` package too), or None."""
    import importlib.util

    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    return found if found and importlib.util.find_spec("playwright") is not None else None


def viewer_screenshot(html: Path, width: int, height: int, browser: str | None = None, timeout_s: float = 60.0,
                      settle_ms: int = 2000):
    """The HTML viewer at ``width`` x ``height`` in headless Chromium (software WebGL), started without its intro
    flight (``?noanim``) and without UI: an (H,W,3) uint8 array, taken ``settle_ms`` after the canvas stops
    being blank (for the sort and the last frames), or the last blank one at ``timeout_s``."""
    import io
    import time

    import numpy as np
    from playwright.sync_api import sync_playwright

    browser = browser or chromium_path()
    if browser is None:
        raise LyraConfigError("a viewer screenshot needs Chromium and the playwright package")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser, args=["--no-sandbox", "--use-angle=swiftshader",
                                                              "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"])
        page = b.new_page(viewport={"width": width, "height": height})
        page.goto(html.resolve().as_uri() + "?noanim&noui")
        deadline, shot = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            page.wait_for_timeout(1000)
            shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
            if shot.std() > 10:  # drawn (a blank canvas is one flat colour)
                page.wait_for_timeout(settle_ms)
                shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
                break
        b.close()
    return shot
