"""Shared checks of local checkpoint folders (nothing is ever downloaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lyra_ops.errors import LyraConfigError


def local_folder(model_path: str | os.PathLike[str], field: str, what: str) -> Path:
    """The folder of config key ``field``; raises naming the key when it is not a directory."""
    root = Path(model_path).expanduser()
    if not root.is_dir():
        raise LyraConfigError(f"{field}: {root} is not a directory (a local {what} folder is expected; nothing is "
                              "downloaded)")
    return root


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON file of a checkpoint folder; missing or corrupt files raise naming the file."""
    if not path.is_file():
        raise LyraConfigError(f"{path}: missing ({what}); save the model with save_pretrained")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LyraConfigError(f"{path}: corrupt {what} ({exc})") from None
