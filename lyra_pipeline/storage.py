"""Compatibility name of :mod:`lyra_pipeline.store.runstore` (the run store moved into ``lyra_pipeline.store``)."""

from lyra_pipeline.store.runstore import *  # noqa: F403
from lyra_pipeline.store.runstore import (  # noqa: F401 - explicit names for readers and type checkers
    ALL_STAGES,
    EVAL_STAGES,
    MANIFEST_INDEX,
    MANIFEST_SCHEMA,
    PROMPT_SCHEMA,
    SCENE_STAGES,
    STAGES,
    TRAJECTORY_STAGES,
    ManifestRow,
    RunStore,
    TextEmbeddingCache,
    content_key,
    validate_scene_id,
)
