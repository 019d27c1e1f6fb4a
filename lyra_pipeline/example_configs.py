"""The example config files shipped with the package (``lyra_pipeline/examples/*.yaml``, package data; a source
checkout's ``configs/`` links to them): ``lyra example-config [NAME] [--out FILE]`` lists, prints or writes them,
so help texts and errors can name an example that exists for a pip install too."""

from __future__ import annotations

import difflib
from importlib.resources import files

from lyra_ops.errors import LyraInputError

SUFFIX = ".yaml"


def _root():
    return files("lyra_pipeline") / "examples"


def example_names() -> list[str]:
    """Every shipped example, as ``lyra example-config`` names it: ``text_prompts``, ``train/fuse``, ..."""
    names = []

    def walk(folder, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif entry.name.endswith(SUFFIX):
                names.append(prefix + entry.name[: -len(SUFFIX)])

    walk(_root(), "")
    return sorted(names)


def example_text(name: str) -> str:
    """The YAML text of example ``name`` (``.yaml`` optional); one ``LyraInputError`` line naming the shipped
    examples else."""
    key = name.strip().replace("\\", "/").removeprefix("configs/").removesuffix(SUFFIX)
    names = example_names()
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LyraInputError(f"example config {name!r}: no such example{hint}; shipped: {', '.join(names)}")
    entry = _root()
    *folders, leaf = key.split("/")
    for part in folders:
        entry = entry / part
    return (entry / (leaf + SUFFIX)).read_text(encoding="utf-8")


def example_summary(name: str) -> str:
    """The first comment line of an example (what it is for)."""
    for line in example_text(name).splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
