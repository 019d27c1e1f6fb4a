"""Prefect tasks of dataset evaluation: per scene, per trajectory, per frame quality against exact ground truth.

Procedural scenes have exact ground truth: the teacher and the warp are compared with true renders, and the
plain and refined masks with exact visibility from the source camera (ray cast). Image scenes have no ground
truth; only mask coverage is reported for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa
import torch
from prefect import task
from torchmetrics.functional.image import structural_similarity_index_measure

from lyra_ops.images import from_uint8, to_uint8
from lyra_ops.metrics import mask_confusion, psnr, source_visibility
from lyra_ops.prompts import SceneRecord
from lyra_ops.scenes import ProceduralScene, make_scene
from lyra_pipeline.config import RunConfig
from lyra_pipeline.retries import STAGE_TASK_OPTIONS
from lyra_pipeline.stages import StageReport, run_units
from lyra_pipeline.storage import RunStore
from tasks.sdg import IDENTITY, read_cameras, read_tensor

FRAME_SCHEMA = pa.schema([
    ("scene_id", pa.string()), ("trajectory", pa.string()), ("frame", pa.int32()), ("source", pa.string()),
    ("generator", pa.string()),
    ("teacher_psnr_gt", pa.float64()), ("teacher_ssim_gt", pa.float64()), ("warp_psnr_gt", pa.float64()),
    ("valid_plain", pa.float64()), ("valid_refined", pa.float64()),
    ("seen", pa.int64()), ("occluded", pa.int64()), ("outside", pa.int64()),
    ("leak_plain", pa.int64()), ("leak_refined", pa.int64()),
    ("false_hole_plain", pa.int64()), ("false_hole_refined", pa.int64()),
    ("depth_abs_rel", pa.float64()),
])
NAN = float("nan")
EVAL_CHUNK = 2  # frames rendered and scored together: bounds peak memory (benchmarks/bench_run.py --evaluate)


@dataclass(frozen=True)
class SceneTruth:
    """Scene-level ground truth shared by all trajectories of a procedural scene."""

    world: ProceduralScene
    k_src: torch.Tensor  # intrinsics of the first (source) frame
    depth_abs_rel: float  # error of the stored first-frame depth vs exact depth


def scene_truth(store: RunStore, config: RunConfig, scene: SceneRecord) -> SceneTruth:
    world = make_scene(scene.seed, kind=config.scenes.scene_kind)
    k_src = read_tensor(store, scene.scene_id, "input/K")
    depth = read_tensor(store, scene.scene_id, "depth/depth")
    depth_gt = world.render(IDENTITY[None], k_src[None], *depth.shape).depth[0, 0]
    return SceneTruth(world, k_src, float(((depth - depth_gt).abs() / depth_gt.clamp_min(1e-6)).mean()))


def trajectory_frame_rows(store: RunStore, config: RunConfig, scene: SceneRecord, name: str,
                          truth: SceneTruth | None) -> list[dict]:
    """One row of metrics per frame of one trajectory (frame 0, the input view itself, included).

    ``truth`` is None for image scenes, which have no ground truth."""
    sid, base = scene.scene_id, f"trajectories/{name}"
    cams = read_cameras(store, sid, name, config)
    teacher = from_uint8(read_tensor(store, sid, f"{base}/teacher/rgb"))
    warped = from_uint8(read_tensor(store, sid, f"{base}/warp/rgb"))
    plain, refined = read_tensor(store, sid, f"{base}/warp/mask"), read_tensor(store, sid, f"{base}/refine/mask")
    generator = store.scene_group(sid)[f"{base}/teacher/rgb"].attrs.get("generator", "")
    n = len(cams)
    rows = [{"scene_id": sid, "trajectory": name, "frame": f, "source": scene.source, "generator": generator,
             "valid_plain": float(plain[f].float().mean()), "valid_refined": float(refined[f].float().mean())}
            for f in range(n)]
    if truth is None:
        return [{**r, **dict.fromkeys(("teacher_psnr_gt", "teacher_ssim_gt", "warp_psnr_gt", "depth_abs_rel"), NAN),
                 **dict.fromkeys(("seen", "occluded", "outside", "leak_plain", "leak_refined", "false_hole_plain",
                                  "false_hole_refined"), 0)} for r in rows]
    for lo in range(0, n, EVAL_CHUNK):  # a few frames at a time: the exact render's ray buffers stay small
        sl = slice(lo, min(lo + EVAL_CHUNK, n))
        gt = truth.world.render(cams.c2w[sl], cams.K[sl], cams.height, cams.width)
        gt_rgb = from_uint8(to_uint8(gt.rgb))  # the same 8-bit quantisation as stored frames
        teacher_psnr = psnr(teacher[sl], gt_rgb)
        teacher_ssim = structural_similarity_index_measure(teacher[sl], gt_rgb, data_range=1.0, reduction="none")
        warp_psnr = psnr(warped[sl], gt_rgb, refined[sl])
        for i, f in enumerate(range(sl.start, sl.stop)):
            vis = source_visibility(truth.world, gt.depth[i, 0], cams.c2w[f], cams.K[f], truth.k_src)
            cp, cr = mask_confusion(plain[f, 0], vis), mask_confusion(refined[f, 0], vis)
            rows[f].update(teacher_psnr_gt=float(teacher_psnr[i]), teacher_ssim_gt=float(teacher_ssim[i]),
                           warp_psnr_gt=float(warp_psnr[i]), seen=cp["seen"], occluded=cp["occluded"],
                           outside=cp["outside"], leak_plain=cp["leak"], leak_refined=cr["leak"],
                           false_hole_plain=cp["false_hole"], false_hole_refined=cr["false_hole"],
                           depth_abs_rel=truth.depth_abs_rel)
    return rows


@task(name="evaluate", **STAGE_TASK_OPTIONS)
def evaluate_scene(store_url: str, config: RunConfig, scene: SceneRecord, run_id: str = "") -> StageReport:
    """Per-frame dataset metrics of one scene, written to ``eval/frames/<scene_id>.parquet``."""
    sid = scene.scene_id
    old = RunStore(store_url).read_scene_table("frames", sid)
    rows: dict[str, list[dict]] = {n: [] for n in config.trajectory_names}
    for r in old.to_pylist() if old is not None else []:
        if r["trajectory"] in rows:
            rows[r["trajectory"]].append(r)

    truth: list[SceneTruth | None] = []  # computed once, by the first trajectory that needs work

    def compute(store: RunStore, name: str) -> None:
        if not truth:
            truth.append(scene_truth(store, config, scene) if scene.source == "procedural" else None)
        rows[name] = trajectory_frame_rows(store, config, scene, name, truth[0])
        # Rows are written before the unit is marked done: a crash re-computes, never loses.
        table = pa.Table.from_pylist([r for n in config.trajectory_names for r in rows[n]], schema=FRAME_SCHEMA)
        store.write_scene_table("frames", sid, table)

    return run_units(store_url, config, scene, "evaluate", run_id, compute)


def summarize_frames(table: pa.Table) -> list[dict]:
    """Aggregates per trajectory and overall: mean PSNR/SSIM over frames 1.. (frame 0 is the input view; frames
    with infinite PSNR, i.e. exact, are left out of the mean) and pooled mask rates (leakage = leaked / occluded
    pixels, false holes = holes / seen pixels)."""
    rows = [r for r in table.to_pylist() if r["frame"] > 0]

    def agg(label: str, rs: list[dict]) -> dict:
        def mean(key: str) -> float:
            """Mean over finite values; +inf if every value is +inf (e.g. PSNR of an exact oracle)."""
            vals = [r[key] for r in rs if r[key] is not None and not math.isnan(r[key])]
            finite = [v for v in vals if math.isfinite(v)]
            if finite:
                return sum(finite) / len(finite)
            return math.inf if vals else NAN

        def rate(num: str, den: str) -> float:
            d = sum(r[den] for r in rs)
            return sum(r[num] for r in rs) / d if d else NAN

        return {"group": label, "frames": len(rs), "scenes": len({r["scene_id"] for r in rs}),
                "teacher_psnr_gt": mean("teacher_psnr_gt"), "teacher_ssim_gt": mean("teacher_ssim_gt"),
                "warp_psnr_gt": mean("warp_psnr_gt"), "valid_plain": mean("valid_plain"),
                "valid_refined": mean("valid_refined"),
                "leak_rate_plain": rate("leak_plain", "occluded"),
                "leak_rate_refined": rate("leak_refined", "occluded"),
                "false_hole_rate_plain": rate("false_hole_plain", "seen"),
                "false_hole_rate_refined": rate("false_hole_refined", "seen"),
                "depth_abs_rel": mean("depth_abs_rel")}

    groups = sorted({r["trajectory"] for r in rows})
    return [agg(g, [r for r in rows if r["trajectory"] == g]) for g in groups] + [agg("all", rows)]
