"""The run store and everything that keeps it trustworthy (see storage_layout.md).

* :mod:`.runstore`  ``RunStore``: the only code that knows paths, Zarr groups and Parquet tables; every array
  is written with a per-chunk crc32c checksum and every chunk (empty ones too), so damage is detected on read.
* :mod:`.dataset`   the dataset a store was made for (``dataset.json``): commands on an existing store use it,
  and no command but ``lyra run`` changes its scene list.
* :mod:`.verify`    ``lyra verify [--repair]``: every chunk and table of every finished unit checked; damaged
  units marked for recompute.
* :mod:`.interrupt` clean Ctrl-C / SIGTERM: in-flight units recorded as interrupted, never failed.
"""

from lyra_pipeline.store.runstore import (
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

__all__ = ["ALL_STAGES", "EVAL_STAGES", "MANIFEST_INDEX", "MANIFEST_SCHEMA", "PROMPT_SCHEMA", "SCENE_STAGES", "STAGES",
           "TRAJECTORY_STAGES", "ManifestRow", "RunStore", "TextEmbeddingCache", "content_key", "validate_scene_id"]
