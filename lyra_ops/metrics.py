"""Dataset-quality metrics against exact ground truth (procedural scenes): visibility, mask confusion, PSNR.

Visibility is exact: a target pixel's surface point (from the ground-truth render) is *seen by the source*
iff it lies inside the source image and nothing sits between it and the source camera (ray cast).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lyra_ops.warp import unproject_depth


@dataclass(frozen=True)
class SourceVisibility:
    """Per target pixel (H,W) bools: seen by the source camera; inside its image; > 1 px outside its image.

    ``inside & ~seen`` are pixels whose surface the source camera could have seen but that were hidden behind
    something (disocclusions: what conservative masking targets). Pixels in the 1 px band around the source
    image border are in neither ``inside`` nor ``outside`` (a splat's bilinear footprint reaches into it).
    """

    seen: torch.Tensor
    inside: torch.Tensor
    outside: torch.Tensor


def source_visibility(scene, depth_tgt: torch.Tensor, c2w_tgt: torch.Tensor, K_tgt: torch.Tensor,
                      K_src: torch.Tensor, c2w_src: torch.Tensor | None = None) -> SourceVisibility:
    """Exact visibility from the source camera of the surface seen at every target pixel.

    Args:
        scene: a ``lyra_ops.scenes.ProceduralScene`` (anything with ``visible_from(points, camera_center)``).
        depth_tgt: (H,W) ground-truth z-depth of the target view.
        c2w_tgt, K_tgt: target pose (4,4) and intrinsics (3,3).
        K_src, c2w_src: source intrinsics and pose (identity by default: world = first camera).
    """
    h, w = depth_tgt.shape
    c2w_src = torch.eye(4, dtype=torch.float64) if c2w_src is None else c2w_src.to(torch.float64)
    pts = unproject_depth(depth_tgt, K_tgt, c2w_tgt).reshape(-1, 3).to(torch.float64)
    unoccluded = scene.visible_from(pts, c2w_src[:3, 3])
    w2c = torch.linalg.inv(c2w_src)
    cam = pts @ w2c[:3, :3].T + w2c[:3, 3]
    uvw = cam @ K_src.to(torch.float64).T
    z = uvw[:, 2]
    u, v = uvw[:, 0] / z, uvw[:, 1] / z
    valid = (z > 0) & (depth_tgt.reshape(-1) > 0)
    inside = valid & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    outside = ~valid | (u < -1) | (u > w + 1) | (v < -1) | (v > h + 1)
    return SourceVisibility((unoccluded & inside).reshape(h, w), inside.reshape(h, w), outside.reshape(h, w))


def mask_confusion(mask: torch.Tensor, vis: SourceVisibility) -> dict[str, int]:
    """Pixel counts of a warp mask (H,W) against exact visibility.

    leak = marked valid but hidden in the source (disoccluded); false_hole = marked hole but seen by the source;
    outside_valid = marked valid but > 1 px outside the source image. ``*_interior`` counts only occluded
    pixels more than 1 px from any seen pixel: leaks there are background shining through a surface, while
    leaks on the 1 px rim are the bilinear splat footprint straddling a silhouette.
    """
    occluded = vis.inside & ~vis.seen
    near_seen = torch.nn.functional.max_pool2d(vis.seen[None, None].float(), 3, 1, 1)[0, 0] > 0
    interior = occluded & ~near_seen
    return {
        "occluded_interior": int(interior.sum()),
        "leak_interior": int((mask & interior).sum()),
        "seen": int(vis.seen.sum()),
        "occluded": int(occluded.sum()),
        "outside": int(vis.outside.sum()),
        "leak": int((mask & occluded).sum()),
        "false_hole": int((~mask & vis.seen).sum()),
        "outside_valid": int((mask & vis.outside).sum()),
    }


def psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
         data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image of (N,C,H,W) tensors in [0, data_range], over ``mask`` (N,1,H,W) if given.

    Images are clipped to [0, data_range] first (as Lyra's metric). Returns (N,), +inf for identical images,
    NaN where the mask is empty.
    """
    p = pred.clamp(0, data_range).to(torch.float64)
    t = target.clamp(0, data_range).to(torch.float64)
    err = (p - t) ** 2
    if mask is None:
        mse = err.flatten(1).mean(dim=1)
    else:
        m = mask.to(torch.float64).expand_as(err)
        mse = (err * m).flatten(1).sum(dim=1) / m.flatten(1).sum(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)
