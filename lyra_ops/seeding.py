"""Deterministic seeds: every random draw flows from (run seed, scene id, purpose), never from global state."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a generator is made: the scene list is built without it
    import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (run seed, scene id, stage, trajectory...), stable across runs/machines."""
    blob = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & ((1 << 63) - 1)


def numpy_rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*parts))


def torch_generator(*parts: object) -> torch.Generator:
    import torch

    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g
