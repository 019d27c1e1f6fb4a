"""Contact sheets of a stored scene: input, depth, and per trajectory warped frames, masks and teacher frames."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lyra_pipeline.storage import RunStore

LABEL_H = 14


def depth_to_rgb(depth: np.ndarray) -> np.ndarray:
    """Inverse-depth false colour (near = bright), uint8 (H,W,3); zeros stay black."""
    valid = depth > 0
    inv = np.zeros_like(depth, dtype=np.float64)
    inv[valid] = 1.0 / depth[valid]
    if valid.any():
        lo, hi = np.percentile(inv[valid], [1, 99])
        inv = np.clip((inv - lo) / max(hi - lo, 1e-12), 0, 1)
    # simple perceptual-ish ramp: dark blue -> teal -> yellow
    r = np.clip(1.5 * inv - 0.3, 0, 1)
    g = np.clip(1.2 * inv, 0, 1) * 0.9 + 0.1 * valid
    b = np.clip(0.6 - 0.6 * inv, 0, 1) * valid
    out = np.stack([r, g, b], axis=-1) * valid[..., None]
    return (out * 255).round().astype(np.uint8)


def _tile(img: np.ndarray, label: str) -> Image.Image:
    """(H,W,3) uint8 or (H,W) bool -> labelled PIL tile."""
    if img.dtype == bool:
        img = np.repeat(img[..., None].astype(np.uint8) * 255, 3, axis=-1)
    h, w = img.shape[:2]
    tile = Image.new("RGB", (w, h + LABEL_H), (24, 24, 24))
    tile.paste(Image.fromarray(img), (0, LABEL_H))
    ImageDraw.Draw(tile).text((2, 1), label, fill=(230, 230, 230), font=ImageFont.load_default())
    return tile


def _chw(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, 0, -1)


def contact_sheet(store: RunStore, scene_id: str, trajectories: list[str] | None = None,
                  num_frames: int = 4) -> Image.Image:
    """One row per trajectory: warped / plain mask / refined mask / teacher at ``num_frames`` frame indices."""
    rows: list[list[Image.Image]] = []
    have = store.list_arrays(scene_id)
    head = []
    if "input/rgb" in have:
        head.append(_tile(_chw(store.read_array(scene_id, "input/rgb")), f"{scene_id} input"))
    if "depth/depth" in have:
        head.append(_tile(depth_to_rgb(store.read_array(scene_id, "depth/depth")), "depth (inverse)"))
    if "depth/reliable" in have:
        head.append(_tile(~store.read_array(scene_id, "depth/reliable"), "depth edges (seams)"))
    rows.append(head)
    names = trajectories or sorted({p.split("/")[1] for p in have if p.startswith("trajectories/")})
    for name in names:
        base = f"trajectories/{name}"
        if f"{base}/warp/rgb" not in have:
            continue
        warp = store.read_array(scene_id, f"{base}/warp/rgb")
        t = warp.shape[0]
        idx = sorted({round(i * (t - 1) / max(num_frames - 1, 1)) for i in range(num_frames)})
        for i in idx:
            row = [_tile(_chw(warp[i]), f"{name} f{i} warped")]
            row.append(_tile(store.read_array(scene_id, f"{base}/warp/mask")[i, 0], "splat mask"))
            if f"{base}/refine/mask" in have:
                refined = store.read_array(scene_id, f"{base}/refine/mask")[i, 0]
                row.append(_tile(refined, "refined mask"))
                masked = np.where(refined[..., None], _chw(warp[i]), 0).astype(np.uint8)
                row.append(_tile(masked, "warped x refined"))
            if f"{base}/teacher/rgb" in have:
                row.append(_tile(_chw(store.read_array(scene_id, f"{base}/teacher/rgb")[i]), "teacher"))
            rows.append(row)
    width = max(sum(t.width for t in r) for r in rows if r)
    height = sum(max(t.height for t in r) for r in rows if r)
    sheet = Image.new("RGB", (width, height), (0, 0, 0))
    y = 0
    for r in rows:
        x = 0
        for t in r:
            sheet.paste(t, (x, y))
            x += t.width
        y += max((t.height for t in r), default=0)
    return sheet
