"""The run store and everything that keeps it trustworthy (see storage_layout.md).

* :mod:`.runstore`  ``RunStore``: the only code that knows paths, Zarr groups and Parquet tables; every array
  is written with a per-chunk crc32c checksum and every chunk (empty ones too), so damage is detected on read.
* :mod:`.dataset`   the dataset a store was made for (``dataset.json``): commands on an existing store use it,
  and no command but ``lyra run`` changes its scene list.
* :mod:`.verify`    ``lyra verify [--repair]``: every chunk and table of every finished unit checked; damaged
  units marked for recompute.
* :mod:`.interrupt` clean Ctrl-C / SIGTERM: in-flight units recorded as interrupted, never failed.
"""

from lyra_pipeline.store.names import ALL_STAGES, EVAL_STAGES, SCENE_STAGES, STAGES, TRAJECTORY_STAGES

__all__ = ["ALL_STAGES", "EVAL_STAGES", "MANIFEST_INDEX", "MANIFEST_SCHEMA", "PROMPT_SCHEMA", "SCENE_STAGES", "STAGES",
           "TRAJECTORY_STAGES", "ManifestRow", "RunStore", "TextEmbeddingCache", "content_key", "validate_scene_id"]


def __getattr__(name: str):
    """The run store's names load :mod:`.runstore` (Zarr, Arrow, fsspec) on first use, so that ``import
    lyra_pipeline.store.interrupt`` or the CLI's argument checks stay light (PEP 562)."""
    if name in __all__:
        from lyra_pipeline.store import runstore

        return getattr(runstore, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
