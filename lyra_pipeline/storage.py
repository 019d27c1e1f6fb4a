"""Compatibility name of :mod:`lyra_pipeline.store` (the run store moved into that package)."""

from lyra_pipeline.store import *  # noqa: F403
from lyra_pipeline.store import __all__  # noqa: F401
