"""Monocular depth with a ``transformers`` depth-estimation model (Depth Anything, DPT, ZoeDepth...) from a local
folder, behind the ``DepthEstimator`` seam.

Metric models (``depth_estimation_type: metric`` in their config, or ZoeDepth) give z-depth directly. Relative
models give an affine-invariant inverse depth (larger = nearer); it is mapped to metric z-depth with a fixed,
documented rule: robust-normalise the disparity to [0, 1] (2nd / 98th percentiles) and interpolate inverse depth
between 1/far and 1/near (``depth.relative_near`` / ``depth.relative_far``). The camera intrinsics come from the
run config (``video.hfov_deg``): these models predict none.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from lyra_ops.depth import DepthPrediction
from lyra_ops.errors import LyraConfigError
from lyra_pipeline.backends.local import local_folder, read_json

_MODELS: dict[tuple, tuple] = {}
_LOCK = threading.Lock()
METRIC_MODEL_TYPES = ("zoedepth",)


def inspect_depth_checkpoint(model_path: str | os.PathLike[str]) -> dict:
    """Validate a local transformers depth-estimation folder from its config (no weights loaded)."""
    root = local_folder(model_path, "depth.model_path", "transformers depth-estimation model")
    cfg_path = root / "config.json"
    cfg = read_json(cfg_path, "model config")
    archs = cfg.get("architectures") or []
    if not any(a.endswith("ForDepthEstimation") for a in archs):
        raise LyraConfigError(f"{cfg_path}: architectures {archs} has no *ForDepthEstimation model (model_type "
                              f"{cfg.get('model_type')!r}); expected e.g. DepthAnythingForDepthEstimation")
    if not list(root.glob("*.safetensors")) and not list(root.glob("*.bin")):
        raise LyraConfigError(f"{root}: no weight files (*.safetensors / *.bin)")
    return cfg


def depth_kind(cfg: dict, override: str = "auto") -> str:
    """'metric' or 'relative' for a model config (``override`` wins unless 'auto')."""
    if override != "auto":
        return override
    if cfg.get("depth_estimation_type") in ("metric", "relative"):
        return cfg["depth_estimation_type"]
    return "metric" if cfg.get("model_type") in METRIC_MODEL_TYPES else "relative"


def relative_to_metric(disparity: torch.Tensor, near: float, far: float) -> torch.Tensor:
    """Affine-invariant inverse depth -> z-depth in [near, far] (see the module docstring)."""
    lo, hi = torch.quantile(disparity.flatten().float(), torch.tensor([0.02, 0.98]))
    norm = ((disparity - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0)
    inverse = 1.0 / far + norm * (1.0 / near - 1.0 / far)
    return 1.0 / inverse


class TransformersDepth:
    """``DepthEstimator`` over ``AutoModelForDepthEstimation`` + its image processor from a local folder."""

    name = "transformers"

    def __init__(self, model_path: str, *, kind: str = "auto", near: float = 0.5, far: float = 20.0,
                 device: str = "cpu") -> None:
        self.cfg = inspect_depth_checkpoint(model_path)
        self.path, self.device = str(Path(model_path).expanduser().resolve()), device
        self.kind, self.near, self.far = depth_kind(self.cfg, kind), near, far

    def _load(self):
        key = (self.path, self.device)
        with _LOCK:
            if key not in _MODELS:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                from transformers import AutoImageProcessor, AutoModelForDepthEstimation

                try:
                    model = AutoModelForDepthEstimation.from_pretrained(self.path, local_files_only=True)
                    processor = (AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
                                 if (Path(self.path) / "preprocessor_config.json").is_file() else None)
                except Exception as exc:  # noqa: BLE001 - transformers raises many types for bad folders
                    raise LyraConfigError(f"{self.path}: cannot load the depth model ({type(exc).__name__}: "
                                          f"{exc})") from None
                _MODELS[key] = (model.to(self.device).eval(), processor)
            return _MODELS[key]

    def estimate(self, image: torch.Tensor, K: torch.Tensor) -> DepthPrediction:
        model, processor = self._load()
        h, w = image.shape[-2:]
        if processor is not None:
            pixels = processor(images=image.clamp(0, 1), return_tensors="pt", do_rescale=False)["pixel_values"]
        else:
            size = (14 * max(1, round(h / 14)), 14 * max(1, round(w / 14)))  # ViT patch 14 multiples
            pixels = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            pred = model(pixel_values=pixels.to(self.device)).predicted_depth.float().cpu()
        pred = F.interpolate(pred[:, None], size=(h, w), mode="bicubic", align_corners=False)[0, 0]
        if self.kind == "metric":
            depth = pred
            label = f"transformers {self.cfg.get('model_type')} (metric)"
        else:
            depth = relative_to_metric(pred, self.near, self.far)
            label = (f"transformers {self.cfg.get('model_type')} (relative, mapped to [{self.near}, {self.far}])")
        valid = torch.isfinite(depth) & (depth > 0)
        return DepthPrediction(depth, valid, label)
