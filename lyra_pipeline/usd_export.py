"""OpenUSD export of a stored scene's 3D Gaussians (``lyra export-ply SCENE --format usd|usdz|nurec``).

``usd`` / ``usdz``: one ``UsdVol.ParticleField3DGaussianSplat`` prim, ``/World/Gaussians``, the schema OpenUSD 26
added for 3D Gaussian splats (usd-core >= 26): ``positions``, ``orientations``, ``scales`` (linear),
``opacities`` (in [0, 1]), ``radiance:sphericalHarmonicsCoefficients`` with ``radiance:sphericalHarmonicsDegree``
0 (Lyra's Gaussians carry one colour: the PLY's ``f_dc``), ``extent`` (every Gaussian's 3-sigma box), rendering
hints ``projectionModeHint = perspective`` and ``sortingModeHint = zDepth`` (what our rasterizer does) and an sRGB
colour space. The stage is Y-up in metres (``upAxis = "Y"``, ``metersPerUnit = 1``) and the values are baked in that
frame: Lyra's world (the first input camera's OpenCV frame: x right, y down, z forward) turned 180 degrees about x,
``p_usd = diag(1, -1, -1) p`` and ``q_usd = (0, 1, 0, 0) * q`` (:mod:`lyra_ops.usd_layout` has the conversions). A
dynamic scene (``--times``) is one stage whose attributes are sampled at each exported input frame (time code =
frame index, ``timeCodesPerSecond`` 8, as the PLY sequence's index); each sample is an independent Gaussian set.

``nurec``: the USDZ layout NVIDIA 3DGRUT's ``ply_to_usd`` writes for Omniverse / Isaac Sim 5.x ("NuRec"): a
``default.usda`` root referencing ``gauss.usda``, whose ``UsdVol.Volume`` points its ``density`` and
``emissiveColor`` fields (``OmniNuRecFieldAsset`` prims) at a ``.nurec`` payload, a gzip'd msgpack of the 3DGUT
renderer's settings and the Gaussians as float16 pre-activation arrays (positions, (w, x, y, z) rotations, log
scales, logit densities, SH DC ``features_albedo`` and 45 zero ``features_specular``, degree 3, as 3DGRUT gives a
DC-only PLY). The arrays stay in Lyra's OpenCV frame; the Volume's transform turns them into the Z-up stage,
(x, y, z) -> (x, z, -y). Written from 3DGRUT's exporter source (nv-tlabs/3dgrut, threedgrut/export/usd/nurec/);
not loaded in Isaac Sim here (README, "USD export").

``pxr`` (usd-core) is imported only here and only when a USD format is asked for: without it the export stops
with one line naming ``pip install 'lyra-pipeline[usd]'``.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lyra_ops.errors import LyraConfigError, LyraInputError
from lyra_ops.gaussians import PLY_LOG_SCALE_EPS, PLY_OPACITY_EPS, SH_C0, Gaussians
from lyra_ops.usd_layout import (
    OPENCV_TO_Y_UP,
    OPENCV_TO_Z_UP,
    ParticleArrays,
    flatten_sh,
    sh_from_colors,
    to_usd_frame,
    wxyz_to_xyzw,
)

USD_FORMATS = ("usd", "usdz", "nurec")
SUFFIXES = {"usd": (".usd", ".usda", ".usdc"), "usdz": (".usdz",), "nurec": (".usdz",)}
DEFAULT_SUFFIX = {"usd": ".usd", "usdz": ".usdz", "nurec": ".nurec.usdz"}
INSTALL_HINT = "pip install 'lyra-pipeline[usd]'"
PRIM_PATH = "/World/Gaussians"
COLOR_SPACE = "srgb_rec709_scene"  # Gf.ColorSpaceNames.SRGBRec709: the colours are display sRGB values
SEQUENCE_FPS = 8.0  # export_sequence's default (the fps of its <stem>.sequence.json)

# NuRec (3DGRUT's Omniverse layout): the payload's renderer settings for a PLY without a training config
# (3DGRUT's defaults for PLY input: configs/render/3dgut.yaml and base_gs.yaml agree), its SH degree and the
# Omniverse render settings 3DGRUT authors on the layers.
NUREC_VERSION = "0.2.576"
NUREC_SH_DEGREE = 3
NUREC_SPECULAR = 3 * ((NUREC_SH_DEGREE + 1) ** 2 - 1)
NUREC_TIMECODES_PER_SECOND = 24.0
NUREC_RENDER_SETTINGS = {
    "rtx:rendermode": "RaytracedLighting",
    "rtx:directLighting:sampledLighting:samplesPerPixel": 8,
    "rtx:post:histogram:enabled": False,
    "rtx:post:registeredCompositing:invertToneMap": True,
    "rtx:post:registeredCompositing:invertColorCorrection": True,
    "rtx:material:enableRefraction": False,
    "rtx:post:tonemap:op": 2,
    "rtx:raytracing:fractionalCutoutOpacity": False,
    "rtx:matteObject:visibility:secondaryRays": True,
}
USDZ_ALIGN = 64  # USDZ: stored (uncompressed) entries whose data start at multiples of 64 bytes
ZIP_PAD_ID = 0x1986  # the extra-field id that pads a local header to that alignment

Log = Callable[[str], None]


@dataclass(frozen=True)
class UsdExportResult:
    path: Path
    gaussians: list[int]  # per time step (one for a static scene)
    frames: list[int] | None  # the input frames sampled (dynamic scenes), else None
    backdrop: int  # Gaussians of the baked backdrop (in the first step)
    decoder: str
    fallbacks: tuple[str, ...] = ()  # one line per stand-in that made the scene (reconstruct.scene_fallbacks)


def import_pxr(fmt: str):
    """The ``pxr`` modules the export needs (usd-core >= 26, with the ParticleField schema), else one clear line."""
    try:
        from pxr import Gf, Sdf, Usd, UsdGeom, UsdVol, Vt
    except ImportError:
        raise LyraConfigError(f"--format {fmt}: needs usd-core (OpenUSD's Python bindings): {INSTALL_HINT}") from None
    if not hasattr(UsdVol, "ParticleField3DGaussianSplat"):
        raise LyraConfigError(f"--format {fmt}: the installed usd-core {Usd.GetVersion()} lacks "
                              f"UsdVol.ParticleField3DGaussianSplat (usd-core >= 26 has it): {INSTALL_HINT}")
    return Gf, Sdf, Usd, UsdGeom, UsdVol, Vt


def usd_target(out: Path | None, scene: str, fmt: str) -> Path:
    """The output path of a USD export: ``out``, else ``<scene><default suffix>``; one clear line for a suffix
    ``fmt`` does not write."""
    if fmt not in USD_FORMATS:
        raise LyraInputError(f"--format {fmt!r}: expected ply, {', '.join(USD_FORMATS)}")
    target = Path(out) if out is not None else Path(f"{scene}{DEFAULT_SUFFIX[fmt]}")
    if target.suffix.lower() not in SUFFIXES[fmt]:
        raise LyraInputError(f"{target}: --out must end in {' or '.join(SUFFIXES[fmt])} for --format {fmt}")
    return target


def particle_arrays(g: Gaussians, rotation: np.ndarray = OPENCV_TO_Y_UP) -> ParticleArrays:
    """``g`` (Lyra's frame, degree-0 colours) as USD arrays in the frame ``rotation @ p``."""
    g = g.detach().to("cpu", torch.float64)
    return to_usd_frame(g.means.numpy(), g.quats.numpy(), g.scales.numpy(), g.opacities.numpy(),
                        sh_from_colors(g.colors.numpy()), rotation)


# ------------------------------------------------------------------------------------------------------------
# From a store
# ------------------------------------------------------------------------------------------------------------


def export_scene_usd(store_url: str, scene_id: str, out: Path | None, fmt: str, *, times: str | None = None,
                     checkpoint: str | Path | None = None, log: Log | None = None, options=None,
                     fps: float = SEQUENCE_FPS) -> UsdExportResult:
    """Decode a stored scene like ``lyra export-ply`` (same decoder choice, same ``options``: pruning, smoothing,
    backdrop) and write it as ``fmt`` (:data:`USD_FORMATS`) at ``out``. A dynamic scene needs ``times``
    (``all`` or frame indices): one stage with a time sample per frame (``nurec``: exactly one frame). Everything
    is validated, usd-core included, before any decoding or writing."""
    from lyra_pipeline.reconstruct import (
        ExportOptions,
        decode_scene,
        decode_sequence,
        export_ready,
        parse_frames,
        resolve_decoder,
        scene_fallbacks,
    )
    from lyra_pipeline.storage import RunStore
    from lyra_pipeline.training import INPUT_TIMES, is_dynamic_scene, scene_trajectories

    target = usd_target(out, scene_id, fmt)
    import_pxr(fmt)
    options = options or ExportOptions()
    store = RunStore(store_url, create=False)
    fallbacks = tuple(scene_fallbacks(store, scene_id, scene_trajectories(store, scene_id)))
    dynamic = is_dynamic_scene(store, scene_id)
    meta = {"scene": scene_id, **({"madeWith": "; ".join(fallbacks)} if fallbacks else {})}
    if not dynamic:
        if times is not None:
            raise LyraInputError(f"scene {scene_id!r} is static (no input video): export it without --times")
        model, source = resolve_decoder(store, checkpoint, log)
        gaussians, views, trajectories = decode_scene(model, store, scene_id)
        first = views.get(scene_id, trajectories[0])
        g, backdrop = export_ready(gaussians, options, first.cameras, 0, first.frames[0], model.config.background)
        steps, frames = [(None, g)], None
    else:
        if times is None:
            raise LyraInputError(f"scene {scene_id!r} is dynamic (a moving scene): export its Gaussian sequence "
                                 "with --times all, or one time step with e.g. --times 0")
        frames = parse_frames(times, len(store.read_array(scene_id, INPUT_TIMES)))
        if fmt == "nurec" and len(frames) != 1:
            raise LyraInputError(f"--times {times!r}: --format nurec holds one static Gaussian set; choose one frame "
                                 "(e.g. --times 0) or write the sequence with --format usd or usdz")
        model, source = resolve_decoder(store, checkpoint, log, dynamic=True)
        sequence, views, _ = decode_sequence(model, store, scene_id, frames)
        input_view, _ = views.input_view(scene_id)
        steps, backdrop = [], 0
        for i, (frame, gaussians) in enumerate(zip(frames, sequence, strict=True)):
            g, bd = export_ready(gaussians, options, input_view.cameras, frame, input_view.frames[frame],
                                 model.config.background)
            backdrop = bd if i == 0 else backdrop
            steps.append((float(frame) if fmt != "nurec" else None, g))
        meta["frames"] = frames
    meta["decoder"] = source
    if fmt == "nurec":
        write_nurec_usdz(target, steps[0][1], meta=meta)
    else:
        write_particle_field(target, steps, fps=fps, meta=meta)
    return UsdExportResult(target, [g.num for _, g in steps], frames, backdrop, source, fallbacks)


# ------------------------------------------------------------------------------------------------------------
# ParticleField3DGaussianSplat (.usd / .usda / .usdc / .usdz)
# ------------------------------------------------------------------------------------------------------------


FRAME_NOTE = ("Lyra world (first input camera, OpenCV: x right, y down, z forward, metres) rotated 180 degrees "
              "about x into this Y-up stage: p_usd = diag(1, -1, -1) p_lyra, q_usd = (0, 1, 0, 0) * q_lyra")


def write_particle_field(path: Path, steps: list[tuple[float | None, Gaussians]], *, fps: float = SEQUENCE_FPS,
                         meta: dict | None = None) -> Path:
    """Write ``steps`` ((time code or None for a static set, Gaussians in Lyra's frame), ...) as one
    ``ParticleField3DGaussianSplat`` at ``/World/Gaussians`` of a Y-up, metres stage at ``path`` (.usd/.usda/
    .usdc, or .usdz packaged); time-coded steps become time samples (``fps`` time codes per second). Written to a
    temporary file in the same folder first, then moved into place."""
    path = Path(path)
    if not steps:
        raise LyraInputError("write_particle_field: no Gaussian sets to write")
    _, Sdf, Usd, UsdGeom, UsdVol, Vt = import_pxr("usdz" if path.suffix.lower() == ".usdz" else "usd")
    from pxr import UsdUtils

    timed = [t for t, _ in steps if t is not None]
    if timed and len(timed) != len(steps):
        raise LyraInputError("write_particle_field: either every step has a time code or exactly one has none")
    if not timed and len(steps) != 1:
        raise LyraInputError("write_particle_field: several static Gaussian sets; give each a time code")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lyra-usd-") as tmp:
        layer_path = Path(tmp) / (path.stem + (".usdc" if path.suffix.lower() == ".usdz" else path.suffix))
        stage = Usd.Stage.CreateNew(str(layer_path))
        UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.y)
        UsdGeom.SetStageMetersPerUnit(stage, 1.0)
        world = UsdGeom.Xform.Define(stage, "/World")
        stage.SetDefaultPrim(world.GetPrim())
        field = UsdVol.ParticleField3DGaussianSplat.Define(stage, PRIM_PATH)
        prim = field.GetPrim()
        prim.SetDocumentation(f"Lyra 3D Gaussians. Frame: {FRAME_NOTE}.")
        field.CreateProjectionModeHintAttr("perspective")
        field.CreateSortingModeHintAttr("zDepth")
        Usd.ColorSpaceAPI.Apply(prim).CreateColorSpaceNameAttr(COLOR_SPACE)
        attrs = {"positions": field.CreatePositionsAttr(), "orientations": field.CreateOrientationsAttr(),
                 "scales": field.CreateScalesAttr(), "opacities": field.CreateOpacitiesAttr(),
                 "sh": field.CreateRadianceSphericalHarmonicsCoefficientsAttr(), "extent": field.CreateExtentAttr()}
        degree = None
        for time, g in steps:
            arrays = particle_arrays(g)
            if degree is None:
                degree = arrays.sh_degree
                field.CreateRadianceSphericalHarmonicsDegreeAttr(degree)
                attrs["sh"].SetMetadata("elementSize", (degree + 1) ** 2)
            code = Usd.TimeCode.Default() if time is None else Usd.TimeCode(time)
            f32 = np.float32
            attrs["positions"].Set(Vt.Vec3fArray.FromNumpy(arrays.positions.astype(f32)), code)
            attrs["orientations"].Set(Vt.QuatfArray.FromNumpy(wxyz_to_xyzw(arrays.orientations).astype(f32)), code)
            attrs["scales"].Set(Vt.Vec3fArray.FromNumpy(arrays.scales.astype(f32)), code)
            attrs["opacities"].Set(Vt.FloatArray.FromNumpy(arrays.opacities.astype(f32)), code)
            attrs["sh"].Set(Vt.Vec3fArray.FromNumpy(flatten_sh(arrays.sh).astype(f32)), code)
            attrs["extent"].Set(Vt.Vec3fArray.FromNumpy(arrays.extent.astype(f32)), code)
        if timed:
            stage.SetStartTimeCode(min(timed))
            stage.SetEndTimeCode(max(timed))
            stage.SetTimeCodesPerSecond(fps)
            stage.SetFramesPerSecond(fps)
        info = {"frame": FRAME_NOTE, **{k: (list(v) if isinstance(v, list) else v) for k, v in (meta or {}).items()}}
        stage.SetMetadataByDictKey("customLayerData", "lyra", _usd_dict(info))
        stage.GetRootLayer().Save()
        if path.suffix.lower() == ".usdz":
            packaged = Path(tmp) / path.name
            if not UsdUtils.CreateNewUsdzPackage(Sdf.AssetPath(str(layer_path)), str(packaged)):
                raise LyraConfigError(f"{path}: usd-core could not package the USDZ")
            os.replace(packaged, path)
        else:
            del stage
            shutil.move(str(layer_path), str(path))
    return path


def _usd_dict(info: dict) -> dict:
    """Plain values USD dictionaries hold: strings, ints, floats, int lists (as strings otherwise)."""
    out = {}
    for key, value in info.items():
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            out[key] = ",".join(str(v) for v in value)
        elif isinstance(value, str | int | float | bool):
            out[key] = value
        else:
            out[key] = str(value)
    return out


# ------------------------------------------------------------------------------------------------------------
# NuRec USDZ (3DGRUT's Omniverse / Isaac Sim 5.x layout)
# ------------------------------------------------------------------------------------------------------------


def nurec_state(g: Gaussians) -> dict:
    """The 3DGUT ``nre`` model dict of ``g`` (Lyra's frame): settings for a PLY-sourced model and the Gaussians
    as float16 bytes of the pre-activation arrays (the PLY's values: log scales, logit opacities, f_dc)."""
    g = g.detach().to("cpu", torch.float64)
    m = g.num
    op = g.opacities.clamp(PLY_OPACITY_EPS, 1.0 - PLY_OPACITY_EPS)
    arrays = {
        "positions": g.means.numpy(),
        "rotations": g.quats.numpy(),
        "scales": torch.log(g.scales + PLY_LOG_SCALE_EPS).numpy(),
        "densities": torch.logit(op).numpy()[:, None],
        "extra_signal": np.zeros((m, 0)),
        "features_albedo": ((g.colors - 0.5) / SH_C0).numpy(),
        "features_specular": np.zeros((m, NUREC_SPECULAR)),
    }
    prefix = ".gaussians_nodes.gaussians."
    state: dict = {"._extra_state": {"obj_track_ids": {"gaussians": []}}}  # 3DGRUT's key order: data, then shapes
    for name, value in arrays.items():
        state[prefix + name] = np.ascontiguousarray(value.astype("<f2")).tobytes()
    state[prefix + "n_active_features"] = np.array([NUREC_SH_DEGREE], dtype="<i8").tobytes()
    for name, value in arrays.items():
        state[prefix + name + ".shape"] = list(value.shape)
    state[prefix + "n_active_features.shape"] = []
    config = {
        "layers": {"gaussians": {
            "name": "sh-gaussians", "device": "cuda", "density_activation": "sigmoid", "scale_activation": "exp",
            "rotation_activation": "normalize", "precision": 16,
            "particle": {"density_kernel_planar": False, "density_kernel_degree": 2,
                         "density_kernel_density_clamping": True, "density_kernel_min_response": 0.0113,
                         "radiance_sph_degree": NUREC_SH_DEGREE},
            "transmittance_threshold": 0.0001}},
        "renderer": {
            "name": "3dgut-nrend", "log_level": 3, "force_update": False, "update_step_train_batch_end": False,
            "per_ray_features": False, "global_z_order": True,
            "projection": {"n_rolling_shutter_iterations": 5, "ut_dim": 3, "ut_alpha": 1.0, "ut_beta": 2.0,
                           "ut_kappa": 0.0, "ut_require_all_sigma_points": False, "image_margin_factor": 0.1,
                           "min_projected_ray_radius": math.sqrt(0.3)},
            "culling": {"rect_bounding": True, "tight_opacity_bounding": True, "tile_based": True,
                        "near_clip_distance": 1e-8, "far_clip_distance": 3.402823466e38},
            "render": {"mode": "kbuffer", "k_buffer_size": 0}},
        "name": "gaussians_primitive",
        "appearance_embedding": {"name": "skip-appearance", "embedding_dim": 0, "device": "cuda"},
        "background": {"name": "skip-background", "device": "cuda", "composite_in_linear_space": False},
    }
    return {"nre_data": {"version": NUREC_VERSION, "model": "nre", "config": config, "state_dict": state}}


def nurec_payload(g: Gaussians) -> bytes:
    """The ``.nurec`` file: :func:`nurec_state` packed with msgpack, in a gzip stream (level 0, as 3DGRUT)."""
    import msgpack  # a dependency of dask.distributed, which lyra-pipeline requires

    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=0, mtime=0) as fh:
        fh.write(msgpack.packb(nurec_state(g)))
    return buffer.getvalue()


def write_nurec_usdz(path: Path, g: Gaussians, *, meta: dict | None = None) -> Path:
    """``g`` (Lyra's frame) as a NuRec USDZ at ``path``: ``default.usda`` (root, Z-up, metres) referencing
    ``gauss.usda``, whose ``/World/gauss`` Volume (transform: (x, y, z) -> (x, z, -y)) reads ``<stem>.nurec``."""
    Gf, Sdf, Usd, UsdGeom, UsdVol, _ = import_pxr("nurec")
    path = Path(path)
    payload_name = f"{path.name.split('.')[0] or 'scene'}.nurec"
    info = _usd_dict({"frame": "Lyra world (first input camera, OpenCV, metres); the Volume's transform maps it "
                      "into this Z-up stage: (x, y, z) -> (x, z, -y)", **(meta or {})})

    def new_stage():
        stage = Usd.Stage.CreateInMemory()
        UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.z)
        UsdGeom.SetStageMetersPerUnit(stage, 1.0)
        stage.SetTimeCodesPerSecond(NUREC_TIMECODES_PER_SECOND)
        stage.SetDefaultPrim(UsdGeom.Xform.Define(stage, "/World").GetPrim())
        stage.SetMetadataByDictKey("customLayerData", "renderSettings", NUREC_RENDER_SETTINGS)
        stage.SetMetadataByDictKey("customLayerData", "lyra", info)
        return stage

    gauss = new_stage()
    volume = UsdVol.Volume.Define(gauss, "/World/gauss")
    prim = volume.GetPrim()
    to_z_up = np.eye(4)
    to_z_up[:3, :3] = OPENCV_TO_Z_UP
    volume.AddTransformOp().Set(Gf.Matrix4d(*to_z_up.T.flatten().tolist()))  # USD matrices act on row vectors
    prim.CreateAttribute("omni:nurec:isNuRecVolume", Sdf.ValueTypeNames.Bool).Set(True)
    prim.CreateAttribute("omni:nurec:useProxyTransform", Sdf.ValueTypeNames.Bool).Set(False)
    for field, data_type in (("density", "float"), ("emissiveColor", "float3")):
        asset = gauss.DefinePrim(f"/World/gauss/{field}_field" if field == "density" else
                                 "/World/gauss/emissive_color_field", "OmniNuRecFieldAsset")
        volume.CreateFieldRelationship(field, asset.GetPath())
        asset.CreateAttribute("filePath", Sdf.ValueTypeNames.Asset).Set(f"./{payload_name}")
        asset.CreateAttribute("fieldName", Sdf.ValueTypeNames.Token).Set(field)
        asset.CreateAttribute("fieldDataType", Sdf.ValueTypeNames.Token).Set(data_type)
        asset.CreateAttribute("fieldRole", Sdf.ValueTypeNames.Token).Set(field)
        if field == "emissiveColor":  # identity colour correction
            for i, channel in enumerate("RGB"):
                asset.CreateAttribute(f"omni:nurec:ccm{channel}", Sdf.ValueTypeNames.Float4).Set(
                    Gf.Vec4f(*[1.0 if j == i else 0.0 for j in range(4)]))
    means = g.detach().to("cpu", torch.float64).means.numpy()
    lo = means.min(axis=0).tolist() if len(means) else [0.0] * 3
    hi = means.max(axis=0).tolist() if len(means) else [0.0] * 3
    prim.GetAttribute("extent").Set([Gf.Vec3f(*lo), Gf.Vec3f(*hi)])
    prim.CreateAttribute("omni:nurec:offset", Sdf.ValueTypeNames.Float3).Set(Gf.Vec3f(0.0, 0.0, 0.0))
    prim.CreateAttribute("omni:nurec:crop:minBounds", Sdf.ValueTypeNames.Float3).Set(Gf.Vec3f(*lo))
    prim.CreateAttribute("omni:nurec:crop:maxBounds", Sdf.ValueTypeNames.Float3).Set(Gf.Vec3f(*hi))
    prim.CreateRelationship("proxy")

    root = Sdf.Layer.CreateAnonymous(".usda")  # authored without composing: gauss.usda exists only in the package
    root.TransferContent(gauss.GetRootLayer())
    for child in list(root.GetPrimAtPath("/World").nameChildren):
        del root.GetPrimAtPath("/World").nameChildren[child.name]
    over = Sdf.PrimSpec(root.GetPrimAtPath("/World"), "gauss", Sdf.SpecifierOver)
    over.referenceList.Prepend(Sdf.Reference("gauss.usda"))
    entries = [("default.usda", root.ExportToString().encode()), (payload_name, nurec_payload(g)),
               ("gauss.usda", gauss.GetRootLayer().ExportToString().encode())]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lyra-usd-") as tmp:
        staged = Path(tmp) / path.name
        write_usdz_archive(staged, entries)
        os.replace(staged, path)
    return path


def write_usdz_archive(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    """A USDZ package: a zip of stored (uncompressed) ``entries`` in order (the first is the root layer), each
    one's data starting at a multiple of 64 bytes (padding in the local header's extra field)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in entries:
            offset = zf.fp.tell() + 30 + len(name.encode())  # 30: the fixed local header
            pad = -offset % USDZ_ALIGN
            if 0 < pad < 4:  # an extra field is at least its 4-byte header
                pad += USDZ_ALIGN
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            if pad:
                info.extra = struct.pack("<HH", ZIP_PAD_ID, pad - 4) + b"\0" * (pad - 4)
            zf.writestr(info, data)
    return path
