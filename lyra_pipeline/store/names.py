"""The stage names of a run store (no imports: the CLI names them in its help without loading Zarr or Arrow)."""

SCENE_STAGES = ("input", "depth")
TRAJECTORY_STAGES = ("cameras", "warp", "refine", "generate", "latents", "video_depth")
EVAL_STAGES = ("evaluate",)
STAGES = SCENE_STAGES + TRAJECTORY_STAGES
ALL_STAGES = STAGES + EVAL_STAGES
