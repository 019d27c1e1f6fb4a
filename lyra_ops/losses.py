"""Distillation losses of the 3DGS decoder (spec 5.2) with the reference's loss bugs fixed.

Total = 1.0 MSE + 0.5 LPIPS + 0.05 scale/shift-invariant depth [+ 0.1 opacity in the prune stages]. Fixed
against the reference (spec section 8): the depth normaliser's median and scale use valid pixels only and the
loss averages over valid pixels only (weakness 2); the opacity penalty is the mean *activated* opacity, with
no second sigmoid (weakness 1). LPIPS is optional and needs locally stored weights (no download, no
torchvision).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lyra_ops.errors import LyraConfigError, LyraInputError
from lyra_ops.rasterize import RasterOutput

logger = logging.getLogger(__name__)

SSI_SCALE_MIN, SSI_SCALE_MAX = 1e-3, 1e3  # clip of the mean-absolute-deviation scale (reference values)
LPIPS_MAX_HEIGHT = 704  # images are resized to at most this height (keeping aspect) before LPIPS
LPIPS_SKIPPED_MESSAGE = "LPIPS skipped: no local weights configured"
DEPTH_MODES = ("ssi", "log_l1")

# VGG16 ``features`` indices of the five LPIPS slices (ending at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
_VGG16_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_VGG16_CONVS = {
    0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256), 14: (256, 256),
    17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512),
}  # fmt: skip
_VGG16_POOLS = (4, 9, 16, 23)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


# ------------------------------------------------------------------------------------------------------------
# Depth and opacity
# ------------------------------------------------------------------------------------------------------------


def _check_image_pair(pred: torch.Tensor, target: torch.Tensor, name: str, channels: int) -> None:
    for label, value in (("pred", pred), ("target", target)):
        if not isinstance(value, torch.Tensor) or value.ndim != 4 or value.shape[1] != channels:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise LyraInputError(f"{name}: {label} must have shape (N, {channels}, H, W), got {shape}")
    if pred.shape != target.shape:
        raise LyraInputError(
            f"{name}: pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )


def _ssi_normalise(depth: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(N,P) depth -> (depth - median) / mean |depth - median|, statistics over valid pixels; 0 where invalid."""
    masked = torch.where(valid, depth, torch.full_like(depth, float("nan")))
    median = torch.nanmedian(masked, dim=1, keepdim=True).values
    median = torch.where(count > 0, median, torch.zeros_like(median))
    centred = torch.where(valid, depth - median, torch.zeros_like(depth))
    scale = centred.abs().sum(dim=1, keepdim=True) / count.clamp(min=1)
    return centred / scale.clamp(SSI_SCALE_MIN, SSI_SCALE_MAX)


def depth_loss_ssi(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Scale/shift-invariant depth loss (spec 5.2, masking fixed): mean SmoothL1 (beta 1) over valid pixels.

    Each image of ``pred`` and ``target`` (N,1,H,W) is normalised as (D - m) / s with m its median and s the
    mean |D - m| (clipped to [1e-3, 1e3]), both over the valid pixels only. ``valid`` (N,1,H,W) bool defaults
    to finite target > 0; a given mask is intersected with finite target. The loss averages the SmoothL1 of
    the normalised depths over all valid pixels of the batch; invalid pixels (whatever their values) have no
    effect. No valid pixel -> 0 (no NaN, still part of the autograd graph).
    """
    _check_image_pair(pred, target, "depth_loss_ssi", 1)
    target_ok = torch.isfinite(target)
    if valid is None:
        valid = target_ok & (target > 0)
    else:
        if not isinstance(valid, torch.Tensor) or valid.shape != target.shape:
            shape = tuple(valid.shape) if isinstance(valid, torch.Tensor) else type(valid).__name__
            raise LyraInputError(f"depth_loss_ssi: valid must have shape {tuple(target.shape)}, got {shape}")
        valid = valid.bool() & target_ok
    n = pred.shape[0]
    valid = valid.reshape(n, -1)
    pred_flat = pred.reshape(n, -1)
    target_flat = torch.where(valid, target.reshape(n, -1), torch.zeros_like(pred_flat))
    count = valid.sum(dim=1, keepdim=True).to(pred_flat.dtype)
    total = count.sum()
    if float(total) == 0.0:
        return pred_flat[valid].sum()  # an empty sum: 0, attached to the graph
    pred_n = _ssi_normalise(pred_flat, valid, count)
    target_n = _ssi_normalise(target_flat, valid, count)
    per_pixel = F.smooth_l1_loss(pred_n, target_n, reduction="none", beta=1.0)
    return per_pixel[valid].sum() / total


def depth_loss_log_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Metric depth loss: mean |log pred - log target| over valid pixels (N,1,H,W).

    For targets in the cameras' own metric scale (the SDG's warped input depth: exact for procedural scenes,
    the depth model's for images), where Lyra's scale/shift-invariant loss would throw away the scale that
    places the Gaussians. ``valid`` defaults to finite target > 0 and is intersected with it; the prediction is
    clamped to >= 1e-3 before its log. No valid pixel -> 0 (attached to the graph).
    """
    _check_image_pair(pred, target, "depth_loss_log_l1", 1)
    ok = torch.isfinite(target) & (target > 0)
    valid = ok if valid is None else valid.bool() & ok
    if not bool(valid.any()):
        return pred[valid].sum()
    diff = torch.log(pred[valid].clamp(min=1e-3)) - torch.log(target[valid])
    return diff.abs().mean()


def opacity_loss(opacities: torch.Tensor) -> torch.Tensor:
    """Mean of the already-activated opacities (M,) in [0, 1]: the sigmoid is applied once, in the decoder."""
    if not isinstance(opacities, torch.Tensor) or not opacities.is_floating_point():
        raise LyraInputError(f"opacity_loss: opacities must be a floating tensor (M,), got {type(opacities).__name__}")
    if opacities.numel() == 0:
        return opacities.sum()
    return opacities.mean()


# ------------------------------------------------------------------------------------------------------------
# LPIPS (VGG16), pure torch, weights from a local file only
# ------------------------------------------------------------------------------------------------------------


class _LinearHead(nn.Module):
    """LPIPS's NetLinLayer: (dropout, 1x1 conv without bias); the dropout slot keeps the state-dict key names."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


def _vgg16_slice(start: int, stop: int) -> nn.Sequential:
    slice_ = nn.Sequential()
    for index in range(start, stop):
        if index in _VGG16_CONVS:
            module: nn.Module = nn.Conv2d(*_VGG16_CONVS[index], kernel_size=3, padding=1)
        elif index in _VGG16_POOLS:
            module = nn.MaxPool2d(kernel_size=2, stride=2)
        else:
            module = nn.ReLU(inplace=False)
        slice_.add_module(str(index), module)
    return slice_


class _Vgg16Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for k, (start, stop) in enumerate(_VGG16_SLICES, start=1):
            self.add_module(f"slice{k}", _vgg16_slice(start, stop))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for k in range(1, len(_VGG16_SLICES) + 1):
            x = getattr(self, f"slice{k}")(x)
            feats.append(x)
        return feats


class _ScalingLayer(nn.Module):
    """LPIPS's fixed input normalisation (x - shift) / scale for inputs in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class LPIPSLoss(nn.Module):
    """LPIPS (VGG16 variant, v0.1 linear heads) as in the ``lpips`` package, built without torchvision.

    State-dict keys are those of ``lpips.LPIPS(net="vgg")`` (``scaling_layer.shift/scale``,
    ``net.slice{1-5}.{i}.weight/bias``, ``lin{0-4}.model.1.weight``; its duplicate ``lins.{k}.*`` entries are
    accepted and dropped), so a saved ``lpips.LPIPS`` state dict loads strictly; see :func:`make_lpips` for the
    package's separate files. Inputs are images in [0, 1] (N,3,H,W); they are resized to at most ``max_height``
    rows (keeping aspect, as Lyra's ``lpips_img_size_min``) and mapped to [-1, 1]. Returns one value per image
    (N,). Parameters are frozen; gradients flow to the inputs.
    """

    def __init__(self, *, max_height: int | None = LPIPS_MAX_HEIGHT, chunk_size: int = 8) -> None:
        super().__init__()
        self.max_height = max_height
        self.chunk_size = int(chunk_size)
        self.scaling_layer = _ScalingLayer()
        self.net = _Vgg16Features()
        for k, channels in enumerate(_LPIPS_CHANNELS):
            self.add_module(f"lin{k}", _LinearHead(channels))
        self.requires_grad_(False)
        self.eval()

    def load_lpips_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Strictly load an lpips-format state dict; missing ``scaling_layer`` buffers keep their constants."""
        renamed = {}
        for key, value in state_dict.items():
            key = key.removeprefix("module.")
            if not key.startswith("lins."):
                renamed[key] = value
        for name, value in self.scaling_layer.state_dict().items():
            renamed.setdefault(f"scaling_layer.{name}", value.clone())
        expected = self.state_dict()
        missing = sorted(k for k in expected if k not in renamed)
        unexpected = sorted(k for k in renamed if k not in expected)
        wrong = [
            f"{k}: expected {tuple(expected[k].shape)}, found {tuple(v.shape)}"
            for k, v in renamed.items()
            if k in expected and tuple(v.shape) != tuple(expected[k].shape)
        ]
        if missing or unexpected or wrong:
            raise LyraConfigError(
                "LPIPS weights do not match the VGG16 LPIPS layout: "
                f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), "
                f"shape mismatches {wrong[:5]}"
            )
        self.load_state_dict(renamed, strict=True)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if self.max_height is None or height <= self.max_height:
            return x
        new_w = max(1, round(width * self.max_height / height))
        return F.interpolate(x, size=(self.max_height, new_w), mode="bilinear", align_corners=False, antialias=True)

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = self.scaling_layer(a), self.scaling_layer(b)
        total = a.new_zeros(a.shape[0])
        for k, (fa, fb) in enumerate(zip(self.net(a), self.net(b), strict=True)):
            fa = fa / (fa.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}").model((fa - fb) ** 2).mean(dim=(1, 2, 3))
        return total

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS (N,) of images in [0, 1] (N,3,H,W)."""
        _check_image_pair(pred, target, "LPIPSLoss", 3)
        pred = self._resize(pred) * 2.0 - 1.0
        target = self._resize(target) * 2.0 - 1.0
        parts = [
            self._distance(pred[i : i + self.chunk_size], target[i : i + self.chunk_size])
            for i in range(0, pred.shape[0], self.chunk_size)
        ]
        return torch.cat(parts)


def _vgg_backbone_to_lpips(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision vgg16 keys ``features.{i}.weight`` -> LPIPS ``net.slice{k}.{i}.weight`` (classifier dropped)."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith("features."):
            continue
        index = int(key.split(".")[1])
        k = next(n for n, (start, stop) in enumerate(_VGG16_SLICES, start=1) if start <= index < stop)
        out[f"net.slice{k}.{key.removeprefix('features.')}"] = value
    return out


def make_lpips(
    weights_path: str | Path | None = None,
    *,
    backbone_path: str | Path | None = None,
    max_height: int | None = LPIPS_MAX_HEIGHT,
    device: torch.device | str = "cpu",
) -> LPIPSLoss | None:
    """Build LPIPS from local files, or return None (logging ``LPIPS skipped: ...`` once per call) without them.

    ``weights_path``: either a full ``lpips.LPIPS(net="vgg").state_dict()`` saved with ``torch.save``, or the
    package's linear-head file ``lpips/weights/v0.1/vgg.pth`` (keys ``lin{k}.model.1.weight``) together with
    ``backbone_path``, a torchvision VGG16 state dict (``vgg16-397923af.pth``, keys ``features.{i}.*``). Files
    are read with ``torch.load(weights_only=True)``. A configured path that does not exist raises
    ``LyraConfigError`` (never a silent skip). Call it once per run: the caller keeps the module.
    """
    if weights_path is None:
        logger.warning(LPIPS_SKIPPED_MESSAGE)
        return None
    state: dict[str, torch.Tensor] = {}
    for label, path in (("weights_path", weights_path), ("backbone_path", backbone_path)):
        if path is None:
            continue
        path = Path(path)
        if not path.is_file():
            raise LyraConfigError(f"lpips {label}: expected a local .pth state dict, found no file at {path}")
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(loaded, dict):
            raise LyraConfigError(f"lpips {label}: {path} does not hold a state dict (got {type(loaded).__name__})")
        state.update(_vgg_backbone_to_lpips(loaded) if label == "backbone_path" else loaded)
    model = LPIPSLoss(max_height=max_height)
    model.load_lpips_state(state)
    return model.to(device)


# ------------------------------------------------------------------------------------------------------------
# Total
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossWeights:
    """Weights of the distillation loss (Lyra defaults; ``opacity`` is 0.1 in the prune stages)."""

    mse: float = 1.0
    lpips: float = 0.5
    depth: float = 0.05
    opacity: float = 0.0
    depth_mode: str = "ssi"  # "ssi" (Lyra: scale/shift-invariant) or "log_l1" (metric targets)
    gaussian_depth: float = 0.0  # per-Gaussian log-depth vs the input frame's depth (lyra_ops.distill)

    def __post_init__(self) -> None:
        if self.depth_mode not in DEPTH_MODES:
            raise LyraConfigError(f"loss depth_mode: expected one of {DEPTH_MODES}, got {self.depth_mode!r}")


def distillation_loss(
    render: RasterOutput,
    target_rgb: torch.Tensor,
    target_depth: torch.Tensor | None = None,
    opacities: torch.Tensor | None = None,
    *,
    weights: LossWeights | None = None,
    lpips: LPIPSLoss | None = None,
    depth_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of MSE, LPIPS, SSI depth and opacity penalty; returns (total, unweighted parts).

    ``render`` rgb (C,3,H,W) in [0,1] and expected depth (C,1,H,W); ``target_rgb`` (C,3,H,W) in [0,1];
    ``target_depth`` (C,1,H,W) or None (depth term skipped); ``opacities`` (M,) activated, or None (opacity term
    skipped); ``lpips`` the module from :func:`make_lpips`, or None (term skipped). A term is computed only when
    its weight is non-zero and its inputs are present; the parts dict holds the computed ones plus "total".
    Raises ``FloatingPointError`` naming the part(s) that went NaN/Inf.
    """
    weights = weights or LossWeights()
    if not isinstance(render, RasterOutput):
        raise LyraInputError(f"distillation_loss: render must be a RasterOutput, got {type(render).__name__}")
    _check_image_pair(render.rgb, target_rgb, "distillation_loss (rgb)", 3)
    parts: dict[str, torch.Tensor] = {}
    if weights.mse:
        parts["mse"] = F.mse_loss(render.rgb, target_rgb.to(render.rgb.dtype))
    if weights.lpips and lpips is not None:
        parts["lpips"] = lpips(render.rgb, target_rgb.to(render.rgb.dtype)).mean()
    if weights.depth and target_depth is not None:
        depth_fn = depth_loss_log_l1 if weights.depth_mode == "log_l1" else depth_loss_ssi
        parts["depth"] = depth_fn(render.depth, target_depth.to(render.depth.dtype), depth_valid)
    if weights.opacity and opacities is not None:
        parts["opacity"] = opacity_loss(opacities)
    bad = {name: float(value.detach()) for name, value in parts.items() if not bool(torch.isfinite(value.detach()))}
    if bad:
        raise FloatingPointError(
            "distillation_loss: non-finite loss part(s) "
            + ", ".join(f"{name}={value}" for name, value in bad.items())
            + " (check the rendered images/depth, the targets and the decoder outputs for NaN/Inf)"
        )
    if not parts:
        raise LyraInputError("distillation_loss: every term is disabled (all weights zero or inputs missing)")
    total = sum(float(getattr(weights, name)) * value for name, value in parts.items())
    if not math.isfinite(float(total.detach())):
        raise FloatingPointError(f"distillation_loss: total is non-finite ({float(total.detach())}) from {parts}")
    parts["total"] = total
    return total, parts
