"""Reading user inputs (image folders, images, depth maps) with errors that name the file and the problem.

torch loads only once an image has decoded (a missing folder or a broken file is named without it: `lyra run`
checks its inputs before the heavy imports)."""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lyra_ops.errors import LyraInputError
from lyra_ops.prompts import SceneRecord
from lyra_ops.seeding import derive_seed
from lyra_pipeline.storage import validate_scene_id

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ALPHA_BACKGROUND = (255, 255, 255)  # what a non-opaque image is composited over (white, as most viewers show it)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def image_rgb(im: Image.Image, source: str) -> np.ndarray:
    """Any PIL image as (H,W,3) uint8 RGB: EXIF orientation applied; 16-bit and 32-bit integer greyscale scaled
    by their bit depth (PIL's convert("RGB") clips them, so a 16-bit PNG came out white); float greyscale read as
    [0, 1]; palette, CMYK, greyscale by PIL's conversions; an alpha channel that is not fully opaque composited
    over :data:`ALPHA_BACKGROUND` with a warning naming the file."""
    im = ImageOps.exif_transpose(im)
    if im.mode in _SIXTEEN_BIT or im.mode == "I":
        values = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode in _SIXTEEN_BIT or values.max(initial=0) <= 65535 else 4294967295.0
        grey = np.round(np.clip(values / top, 0, 1) * 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode == "F":
        grey = np.round(np.clip(np.asarray(im, dtype=np.float64), 0, 1) * 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if not has_alpha:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:] / 255.0
    if (alpha < 1).any():
        log.warning("%s: %.1f%% of the pixels are not opaque; composited over RGB %s", source,
                    100 * float((alpha < 1).mean()), ALPHA_BACKGROUND)
    out = rgba[..., :3] * alpha + np.asarray(ALPHA_BACKGROUND, dtype=np.float64) * (1 - alpha)
    return np.round(out).astype(np.uint8)


def image_files(folder: Path) -> list[Path]:
    """The images of a folder (``IMAGE_SUFFIXES``, any case), sorted by name."""
    return [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]


_WARNED_NO_PROMPT: set[str] = set()


def scan_image_folder(folder: str | Path, run_seed: int, *, warn: bool = True) -> list[SceneRecord]:
    """Every ``NAME.png|jpg|jpeg|webp`` of a folder with its ``NAME.txt`` prompt (empty if absent; logged when
    ``warn``, so a preflight check followed by the run's own scan warns once)."""
    root = Path(folder)
    if not root.is_dir():
        raise LyraInputError(f"{root}: images folder not found (expected a folder of NAME.png + NAME.txt)")
    records = []
    for path in image_files(root):
        scene_id = validate_scene_id(path.stem, source=str(path))
        prompt_file = path.with_suffix(".txt")
        if prompt_file.exists():
            try:
                text = prompt_file.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as exc:
                raise LyraInputError(f"{prompt_file}: prompt must be UTF-8 text ({exc})") from exc
        else:
            if warn and str(path) not in _WARNED_NO_PROMPT:  # once per image and process (a run scans twice)
                _WARNED_NO_PROMPT.add(str(path))
                log.warning("%s: no prompt file %s, using an empty prompt", path, prompt_file.name)
            text = ""
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        records.append(SceneRecord(scene_id, text, str(path.resolve()), sha, derive_seed(run_seed, scene_id),
                                   "images"))
    if not records:
        raise LyraInputError(f"{root}: no images found (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
    return records


def load_image(path: str | Path, height: int, width: int, *, expected_sha: str | None = None) -> torch.Tensor:
    """Decode an image to (3,H,W) float in [0,1] at the video size (:func:`image_rgb`, cover-crop resize)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise LyraInputError(f"{p}: image file not found") from None
    if expected_sha is not None and hashlib.sha256(data).hexdigest() != expected_sha:
        raise LyraInputError(f"{p}: image changed since the prompt bank was sampled (sha256 mismatch); "
                             "re-run to re-sample")
    try:
        with Image.open(p) as im:
            im.load()
            rgb = image_rgb(im, str(p))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise LyraInputError(f"{p}: cannot decode image ({exc}); expected a PNG/JPEG/WebP file") from exc
    if rgb.shape[0] < 8 or rgb.shape[1] < 8:
        raise LyraInputError(f"{p}: image is {rgb.shape[1]}x{rgb.shape[0]} pixels; expected at least 8x8")
    _warn_small_crop(p, hashlib.sha256(data).hexdigest(), rgb.shape[0], rgb.shape[1], height, width)
    import torch

    from lyra_ops.images import cover_crop_resize

    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0
    return cover_crop_resize(image, height, width)


MIN_CROP_KEPT = 0.25  # below this share of the image kept by the cover crop, a load warns
_WARNED_CROP: set[tuple[str, int, int]] = set()


def crop_kept_fraction(src_h: int, src_w: int, height: int, width: int) -> float:
    """The share of a src_h x src_w image that the cover crop to height x width keeps (1 at the same aspect)."""
    from lyra_ops.images import cover_crop_geometry

    new_h, new_w, _, _ = cover_crop_geometry(src_h, src_w, height, width)
    return (height * width) / (new_h * new_w)


def _warn_small_crop(path: Path, sha: str, src_h: int, src_w: int, height: int, width: int) -> None:
    """One warning line naming ``path`` when the cover crop keeps less than :data:`MIN_CROP_KEPT` of the image
    (e.g. a 4000x8 strip became 13 of its columns scaled 12x); once per image content and size per process."""
    kept = crop_kept_fraction(src_h, src_w, height, width)
    if kept >= MIN_CROP_KEPT or (sha, height, width) in _WARNED_CROP:
        return
    _WARNED_CROP.add((sha, height, width))
    from lyra_ops.images import cover_crop_geometry

    new_h, new_w, _, _ = cover_crop_geometry(src_h, src_w, height, width)
    g = math.gcd(width, height)
    log.warning("%s: the %dx%d image is cover-cropped to the %dx%d video frame, which keeps only %.1f%% of it "
                "(%.0fx%.0f source pixels scaled %.1fx); crop or pad it to about %d:%d first", path, src_w, src_h,
                width, height, 100 * kept, width * src_w / new_w, height * src_h / new_h, new_w / src_w,
                width // g, height // g)


def check_images(records: list[SceneRecord], height: int, width: int) -> None:
    """Decode every image of ``records`` (size >= 8x8, unchanged since scanned) before any work: one
    ``LyraInputError`` naming the first file that fails; a crop that keeps little of an image is warned."""
    for record in records:
        if record.image_path:
            load_image(record.image_path, height, width, expected_sha=record.content_sha)


def load_depth_file(path: str | Path, height: int, width: int) -> torch.Tensor:
    """A user depth map ``NAME.depth.npy`` (H,W) float metric z-depth, resized (nearest) to the video size."""
    p = Path(path)
    if not p.is_file():
        raise LyraInputError(f"{p}: depth file not found (depth.backend file: a NAME.depth.npy (H,W) float array of "
                             "metric z-depth beside each image)")
    try:
        arr = np.load(p, allow_pickle=False)
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
            if isinstance(arr, np.lib.npyio.NpzFile):
                arr.close()
            raise ValueError("not a numeric array")
    except Exception:  # noqa: BLE001 - numpy's own text may suggest a pickle load: never offered
        raise LyraInputError(f"{p}: cannot read depth: not a valid .npy file of numbers; expected an (H,W) float "
                             "array of metric z-depth (numpy.save)") from None
    import torch

    from lyra_ops.depth import check_user_depth
    from lyra_ops.images import cover_crop

    depth = torch.from_numpy(np.asarray(arr, dtype=np.float32))
    check_user_depth(depth, source=str(p))
    return cover_crop(depth[None], height, width, mode="nearest")[0].contiguous()
