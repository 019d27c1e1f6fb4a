"""Content-addressed exports: ``lyra reconstruct`` / ``refine`` / ``export-ply`` redo nothing when nothing changed.

Beside the PLY an export writes a small sidecar ``<stem>.export.json``: the key of what the outputs were made from
(a sha256 of the inputs' bytes and the options: image, depth file, prompt, preset and --config bytes, or the
stored scene's stage keys; export and refinement options; the decoder's weights), the sha256 of every file the
export wrote, how the result was made (``made_with``: the fallback lines) and the export's summary line. A
command whose key matches a sidecar whose files are all still there, unchanged, writes nothing and prints
``up to date: <ply>``. The key is computed and checked here with nothing heavier than hashlib and json (no
torch, no store): before any heavy import or work.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# Part of every key: bump when what an export writes for the same inputs changes.
OUTPUT_KEY_VERSION = 1
SIDECAR_SUFFIX = ".export.json"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lyra-pipeline")
    except PackageNotFoundError:
        return "unknown"


def output_key(inputs: dict[str, Any]) -> str:
    """sha256 of ``inputs`` (JSON, sorted keys) with the package version and :data:`OUTPUT_KEY_VERSION`."""
    blob = json.dumps({"lyra": _package_version(), "outputs": OUTPUT_KEY_VERSION, **inputs}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def sidecar_path(ply: str | Path) -> Path:
    """``<stem>.export.json`` beside ``ply``."""
    ply = Path(ply)
    return ply.with_name(ply.stem + SIDECAR_SUFFIX)


def up_to_date(ply: str | Path, key: str | None) -> dict[str, Any] | None:
    """The sidecar of ``ply`` when its key is ``key`` and every output it lists is there with its recorded
    sha256; else None (``key`` None: never)."""
    if key is None:
        return None
    path = sidecar_path(ply)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("key") != key or not doc.get("outputs"):
            return None
        for name, sha in doc["outputs"].items():
            f = path.parent / name
            if not f.is_file() or sha256_file(f) != sha:
                return None
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return doc


def write_sidecar(ply: str | Path, key: str | None, inputs: dict[str, Any], outputs: list[Path | None],
                  made_with: list[str], summary: str, **extra: Any) -> Path | None:
    """Record ``key`` and the sha256 of ``outputs`` (files beside ``ply``) in ``<stem>.export.json`` (written
    last, atomically: a killed export leaves no sidecar that claims it). ``key`` None (an input that cannot be
    fingerprinted cheaply, e.g. a remote store): no sidecar, and a stale one is removed."""
    path = sidecar_path(ply)
    if key is None:
        path.unlink(missing_ok=True)
        return None
    doc = {"key": key, "inputs": inputs, "made_with": made_with, "summary": summary,
           "outputs": {Path(p).name: sha256_file(p) for p in outputs if p is not None}, **extra}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------------------
# Cheap fingerprints of what an export depends on
# ------------------------------------------------------------------------------------------------------------


def _is_local_store(path: Path) -> bool:
    return (path / "store.json").is_file()


def decoder_fingerprint(store: str | Path | None, checkpoint: str | Path | None) -> str | None:
    """What :func:`lyra_pipeline.reconstruct.load_decoder` would load, fingerprinted without loading it: an
    explicit checkpoint file's sha256; a store's ``train/latest.json`` bytes (a local store with a finished
    training, as checkpoint or as store); else the shipped decoder's ``model.safetensors`` sha256. None when it
    cannot be told cheaply (a remote store, a checkpoint that is neither a file nor a local store)."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.is_file():
            return "checkpoint:" + sha256_file(path)
        if "://" not in str(checkpoint) and path.is_dir() and _is_local_store(path):
            latest = path / "train" / "latest.json"
            return "training:" + sha256_file(latest) if latest.is_file() else None
        return None
    if store is not None:
        if "://" in str(store):
            return None
        latest = Path(store) / "train" / "latest.json"
        if _is_local_store(Path(store)) and latest.is_file():
            return "training:" + sha256_file(latest)
    from lyra_pipeline.shipped import MODEL_FILE, shipped_decoder_dir

    model = shipped_decoder_dir() / MODEL_FILE
    return "shipped:" + sha256_file(model) if model.is_file() else None


def image_prompt(image: Path, prompt: str | None) -> str:
    """The prompt ``reconstruct --image`` records: ``prompt``, else IMAGE.txt beside it, else its name."""
    if prompt is not None:
        return prompt
    sidecar = image.with_suffix(".txt")
    try:
        return sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else image.stem.replace("_", " ")
    except (OSError, UnicodeDecodeError):
        return ""


def depth_beside(image: Path) -> Path | None:
    """``NAME.depth.npy`` beside ``image`` (what ``reconstruct`` uses when no --depth is given), or None."""
    path = image.with_suffix(".depth.npy")
    return path if path.is_file() else None


RECONSTRUCT_SECTIONS = ("depth", "generator")  # what ``reconstruct --image`` takes from a --config file


def reconstruct_sections(tree: dict[str, Any]) -> dict[str, Any]:
    """The sections of a --config tree that ``reconstruct --image`` uses (:data:`RECONSTRUCT_SECTIONS`)."""
    return {k: tree[k] for k in RECONSTRUCT_SECTIONS if k in tree}


def reconstruct_inputs(image: str | Path, *, prompt: str | None, depth: str | Path | None, preset: str,
                       sections: dict[str, Any] | None, checkpoint: str | Path | None, store: str | Path | None,
                       options: dict[str, Any], refine: dict[str, Any] | None, html: bool) -> dict[str, Any] | None:
    """The key material of ``reconstruct --image``: the image's bytes, its prompt, the depth file's bytes
    (``depth``, else NAME.depth.npy beside the image), the preset, the --config sections used (depth,
    generator), the decoder's fingerprint, export and refinement options, --html. None when an input is missing
    or cannot be fingerprinted cheaply (the full command then runs and names any problem)."""
    image = Path(image)
    try:
        if not image.is_file():
            return None
        depth_path = Path(depth) if depth is not None else depth_beside(image)
        decoder = decoder_fingerprint(store, checkpoint)
        if decoder is None:
            return None
        return {
            "command": "reconstruct", "image": image.name, "image_sha256": sha256_file(image),
            "prompt": image_prompt(image, prompt),
            "depth": None if depth_path is None else {"name": depth_path.name, "sha256": sha256_file(depth_path)},
            "preset": preset, "config": sections or {},
            "decoder": decoder, "export": dict(options), "refine": refine, "html": bool(html),
        }  # fmt: skip
    except OSError:
        return None


def scene_inputs(command: str, store: str, scene: str, *, decoder: str | None,
                 options: dict[str, Any], html: bool, **extra: Any) -> dict[str, Any] | None:
    """The key material of ``export-ply`` / ``refine`` of a stored scene: the scene's stage keys as the store
    records them done (what its arrays were made from), the decoder's fingerprint, the options. None for a
    remote store or a scene with nothing done (the full command runs and names any problem)."""
    if decoder is None or "://" in str(store) or not _is_local_store(Path(store)):
        return None
    from lyra_pipeline.storage import RunStore

    try:
        done = RunStore(str(store), create=False).done_keys()
    except Exception:  # noqa: BLE001 - any trouble reading the store: no shortcut, the full command reports it
        return None
    keys = sorted(f"{t}/{stage}:{key}" for (s, t, stage), key in done.items() if s == scene)
    if not keys:
        return None
    return {"command": command, "scene": scene, "scene_keys": keys, "decoder": decoder, "export": dict(options),
            "html": bool(html), **extra}


def scene_export_key(command: str, store: str, scene: str, checkpoint: str | Path | None, options: dict[str, Any],
                     html: bool, *, decoder_needed: bool = True, **extra: Any) -> tuple[str | None, dict | None]:
    """(key, key material) of ``export-ply`` / ``refine`` of a stored scene (:func:`scene_inputs`); (None, None)
    when it cannot be told cheaply."""
    decoder = decoder_fingerprint(store, checkpoint) if decoder_needed else "none"
    inputs = scene_inputs(command, store, scene, decoder=decoder, options=options, html=html, **extra)
    return (output_key(inputs), inputs) if inputs is not None else (None, None)


def up_to_date_lines(ply: str | Path, doc: dict[str, Any]) -> list[str]:
    """What a command prints when its outputs are up to date: the stand-ins that made them (one line each, as
    the run that wrote them said) and ``up to date: <ply>``."""
    others = [str(Path(ply).parent / name) for name in doc.get("outputs", {}) if name != Path(ply).name]
    listed = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
    return [*doc.get("made_with", []),
            f"up to date: {ply} (same inputs and options as when it was written; nothing written"
            + (f"; also {listed})" if others else ")")]
