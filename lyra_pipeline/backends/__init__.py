"""Model backends (local checkpoints) and the factories that pick one from the config."""

from __future__ import annotations

from typing import Any


def depth_estimator(depth: Any):
    """The per-image depth estimator of a ``DepthConfig`` whose backend estimates (``transformers``, ``constant``,
    ``planar``; ``procedural`` and ``file`` read exact or given depth instead): ``estimate(rgb, K)`` -> prediction."""
    if depth.backend == "transformers":
        from lyra_pipeline.backends.transformers_depth import TransformersDepth

        return TransformersDepth(depth.model_path, kind=depth.kind, near=depth.relative_near, far=depth.relative_far,
                                 device=depth.device)
    from lyra_ops.depth import ConstantDepth, PlanarDepth

    return ConstantDepth(depth.constant_value) if depth.backend == "constant" else PlanarDepth(depth.constant_value)
