"""Contact sheets of a stored scene: input, depth, and per trajectory warped frames, masks and teacher frames."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lyra_ops.errors import LyraInputError
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


def evenly_spaced(total: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over ``0 .. total - 1`` (first and last included), distinct."""
    return sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(count)})


def spread_frames(c2w: np.ndarray, count: int) -> list[int]:
    """``count`` frames of a camera path (c2w (T,4,4)) spread over where the camera goes, not over frame numbers:
    farthest-point sampling from frame 0 on each camera's centre and the point one unit along its optical axis
    (so turning in place counts too), returned sorted. A two-loop spiral's evenly numbered frames (0, 12, 24 of
    25) all sit at its start; a path that does not move gives :func:`evenly_spaced`."""
    t = int(c2w.shape[0])
    count = min(count, t)
    feats = np.concatenate([c2w[:, :3, 3], c2w[:, :3, 3] + c2w[:, :3, 2]], axis=1).astype(np.float64)
    dist = np.linalg.norm(feats - feats[0], axis=1)
    if count <= 1 or float(dist.max()) < 1e-9:
        return evenly_spaced(t, count)
    picked = [0]
    while len(picked) < count:
        nxt = int(np.argmax(dist))  # first of the farthest on ties
        if dist[nxt] < 1e-9:
            break
        picked.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(feats - feats[nxt], axis=1))
    return sorted(picked)


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
    """One row per trajectory: warped / plain mask / refined mask / teacher at ``num_frames`` frames spread along
    the camera path (:func:`spread_frames`)."""
    rows: list[list[Image.Image]] = []
    have = store.list_arrays(scene_id)
    stored = sorted({p.split("/")[1] for p in have if p.startswith("trajectories/")})
    unknown = [t for t in trajectories or () if t not in stored]
    if unknown:
        raise LyraInputError(f"--trajectory: scene {scene_id!r} has no trajectory {', '.join(map(repr, unknown))}; "
                             f"its trajectories: {', '.join(stored) or 'none'}")
    head = []
    if "input/rgb" in have:
        head.append(_tile(_chw(store.read_array(scene_id, "input/rgb")), f"{scene_id} input"))
    if "depth/depth" in have:
        head.append(_tile(depth_to_rgb(store.read_array(scene_id, "depth/depth")), "depth (inverse)"))
    if "depth/reliable" in have:
        head.append(_tile(~store.read_array(scene_id, "depth/reliable"), "depth edges (seams)"))
    rows.append(head)
    names = trajectories or stored
    for name in names:
        base = f"trajectories/{name}"
        if f"{base}/warp/rgb" not in have:
            continue
        warp = store.read_array(scene_id, f"{base}/warp/rgb")
        if f"{base}/cameras/c2w" in have:
            idx = spread_frames(store.read_array(scene_id, f"{base}/cameras/c2w"), num_frames)
        else:
            idx = evenly_spaced(warp.shape[0], num_frames)
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


# ------------------------------------------------------------------------------------------------------------
# Any array: summary and frame export
# ------------------------------------------------------------------------------------------------------------


def array_info(store: RunStore, scene_id: str, name: str) -> dict:
    """Shape, dtype, chunks, attributes and value statistics of one stored array (read whole)."""
    arrays = store.list_arrays(scene_id)
    if name not in arrays:
        from lyra_ops.errors import LyraStorageError

        raise LyraStorageError(f"{store.url}: scene {scene_id!r} has no array {name!r}; arrays: "
                               f"{', '.join(sorted(arrays))}")
    arr = arrays[name]
    data = store.read_array(scene_id, name)  # checked: a damaged chunk is named, never decoded as garbage
    values = data.astype(np.float64) if data.dtype != bool else data.astype(np.float64)
    finite = np.isfinite(values)
    stats = {"min": float(values[finite].min()), "max": float(values[finite].max()),
             "mean": float(values[finite].mean()), "std": float(values[finite].std())} if finite.any() else {}
    return {"array": name, "shape": tuple(arr.shape), "dtype": str(arr.dtype), "chunks": tuple(arr.chunks),
            "attrs": dict(arr.attrs), "nonfinite": int((~finite).sum()), **stats}


CAMERA_ARRAYS = ("/K", "/c2w", "/w2c")
IMAGE_FORMS = ("frames of a video (T,3,H,W) uint8, masks or depth (T,1,H,W), an image (3,H,W), a depth map or mask "
               "(H,W), or latents (C,T,h,w)")


def array_frames(data: np.ndarray, name: str = "") -> list[np.ndarray]:
    """Viewable uint8 (H,W,3) frames of a stored array, by its layout:

    video (T,3,H,W) uint8 -> frames; masks (T,1,H,W) bool -> white = True; depth-like (T,1,H,W) / (H,W) float ->
    inverse-depth colours; an image (3,H,W); patchify latents (1536,T_l,h,w) -> decoded back to frames; other
    latents (C,T_l,h,w) -> their first three channels, normalised. Anything else (camera matrices, vectors, tables)
    raises ``LyraInputError`` naming the array and the image forms, before any file is written.
    """
    if data.ndim in (2, 3) and data.shape[-2:] in ((3, 3), (4, 4)) or name.endswith(CAMERA_ARRAYS):
        raise LyraInputError(f"{name}: camera matrices {data.shape} have no image form (run without --out to print "
                             f"them); --out exports {IMAGE_FORMS}")
    if data.ndim == 4 and data.shape[1] == 3 and data.dtype == np.uint8:
        return [_chw(f) for f in data]
    if data.ndim == 4 and data.shape[1] == 1:
        if data.dtype == bool:
            return [np.repeat(f[0][..., None].astype(np.uint8) * 255, 3, axis=-1) for f in data]
        return [depth_to_rgb(f[0].astype(np.float64)) for f in data]
    if data.ndim == 3 and data.shape[0] == 3:
        return [_chw(data.astype(np.uint8))]
    if data.ndim == 2:
        if data.dtype == bool:
            return [np.repeat(data[..., None].astype(np.uint8) * 255, 3, axis=-1)]
        return [depth_to_rgb(data.astype(np.float64))]
    if data.ndim == 4 and "latents" in name:
        import torch

        from lyra_ops.latents import PixelPatchifyEncoder

        if data.shape[0] == PixelPatchifyEncoder.latent_channels:
            frames = PixelPatchifyEncoder().decode(torch.from_numpy(data.astype(np.float32)))
            return [((f.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).round().astype(np.uint8) for f in frames]
        first = data[:3].astype(np.float64)
        lo, hi = np.percentile(first, [1, 99])
        norm = ((first - lo) / max(hi - lo, 1e-12)).clip(0, 1)
        return [(np.moveaxis(norm[:, t], 0, -1) * 255).round().astype(np.uint8) for t in range(norm.shape[1])]
    raise LyraInputError(f"{name}: no image form for an array of shape {data.shape} and dtype {data.dtype}; --out "
                         f"exports {IMAGE_FORMS}")


def export_frames(frames: list[np.ndarray], path, fps: int = 12) -> None:
    """``.png``: a grid (up to 8 per row); ``.gif`` / ``.webp``: an animation (Pillow); ``.mp4``: H.264 through
    imageio-ffmpeg's bundled ffmpeg (``pip install lyra-pipeline[video]``; odd sizes padded by one pixel, as
    yuv420p needs even ones). Written to a temporary file beside ``path``, then renamed: a failed encoder leaves
    neither a partial file nor a changed old one (``RuntimeError`` naming the file and ffmpeg's error)."""
    import os
    from pathlib import Path

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".gif", ".webp", ".mp4"):
        raise ValueError(f"{path}: unsupported export format (use .png, .gif, .webp or .mp4)")
    if not frames:
        raise LyraInputError(f"{path}: no frames to export")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial{path.suffix}")
    try:
        if suffix == ".png":
            cols = min(8, len(frames))
            h, w = frames[0].shape[:2]
            rows = (len(frames) + cols - 1) // cols
            grid = Image.new("RGB", (cols * w, rows * h))
            for i, f in enumerate(frames):
                grid.paste(Image.fromarray(f), ((i % cols) * w, (i // cols) * h))
            grid.save(tmp)
        elif suffix in (".gif", ".webp"):
            images = [Image.fromarray(f) for f in frames]
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        else:
            _encode_mp4(frames, tmp, path, fps)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _encode_mp4(frames: list[np.ndarray], tmp, path, fps: int) -> None:
    """H.264 (yuv420p, crf 10) of ``frames`` into ``tmp``; ``RuntimeError`` naming ``path`` when ffmpeg fails."""
    import subprocess

    try:
        import imageio_ffmpeg
    except ImportError as exc:
        raise RuntimeError("mp4 export needs imageio-ffmpeg: pip install 'lyra-pipeline[video]'") from exc
    h, w = frames[0].shape[:2]
    pad = ((0, h % 2), (0, w % 2), (0, 0))
    data = b"".join(np.ascontiguousarray(np.pad(f, pad, mode="edge"), dtype=np.uint8).tobytes() for f in frames)
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-vcodec", "rawvideo",
           "-s", f"{w + w % 2}x{h + h % 2}", "-pix_fmt", "rgb24", "-r", str(fps), "-i", "-", "-an",
           "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", "10", "-f", "mp4", str(tmp)]
    proc = subprocess.run(cmd, input=data, capture_output=True, check=False)
    if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
        lines = [ln.strip() for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()]
        raise RuntimeError(f"{path}: ffmpeg could not encode {len(frames)} frames of {w}x{h} "
                           f"({lines[-1] if lines else f'exit code {proc.returncode}'}); nothing written")
