"""Shared fixtures: example assets, one Prefect test harness per session, temporary stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES_CANDIDATES = [REPO / "shared" / "data" / "lyra_examples", REPO.parent / "shared" / "data" / "lyra_examples"]


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    for cand in EXAMPLES_CANDIDATES:
        if cand.is_dir():
            return cand
    pytest.skip("Lyra example assets (shared/data/lyra_examples) not found")


@pytest.fixture(scope="module")
def torch_single_thread():
    """torch on one intra-op thread for a module (OpenMP threads on busy shared cores made steps ~50x slower)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """``SHIPPED_DECODER`` -> a tiny random decoder folder (tests.test_shipped_decoder.write_shipped), for the
    module that asks for it."""
    import lyra_pipeline.shipped as shipped_mod
    from tests.test_shipped_decoder import write_shipped

    root = write_shipped(tmp_path_factory.mktemp("shipped") / "decoder")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shipped_mod, "SHIPPED_DECODER", root)
        yield root


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (each harness costs ~10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def make_smoke_store(path: Path, num_scenes: int = 3, preset: str = "smoke") -> Path:
    """A finished smoke-preset (or ``preset``) store built in-process, without Prefect (every SDG stage's ``.fn``)."""
    from lyra_pipeline.config import build_config
    from tasks.sdg import SCENE_TASKS, sample_prompts

    overrides = {"scenes": {"num_scenes": num_scenes}}
    config = build_config(preset, overrides)
    for scene in sample_prompts.fn(str(path), config, preset, overrides):  # records the dataset as `lyra run` does
        for task in SCENE_TASKS.values():
            task.fn(str(path), config, scene, "fixture")
    return path


SMALL = {"video": {"height": 48, "width": 80, "num_frames": 9},
         "trajectories": {"names": ["left", "zoom_in", "clockwise"]}}


@pytest.fixture(scope="session")
def finished_store(tmp_path_factory, prefect_harness) -> Path:
    """A finished 2-scene smoke store with SMALL frames, made by the generate-dataset flow (it records its dataset
    as `lyra run` does). Shared by the session: tests that write copy it first (the evaluate flow's tables are
    the only thing a test adds to it)."""
    from flows.generate_dataset import generate_dataset

    root = tmp_path_factory.mktemp("flow") / "store"
    summary = generate_dataset(store=str(root), preset="smoke", overrides=SMALL)
    assert summary["failed_scenes"] == []
    assert summary["computed"] == 2 * (2 + 6 * 3) and summary["skipped"] == 0
    return root


@pytest.fixture(scope="session")
def smoke_store_template(tmp_path_factory) -> Path:
    """A 3-scene smoke store shared by the session; copy it (``smoke_store``) before writing."""
    return make_smoke_store(tmp_path_factory.mktemp("smoke-template") / "store")


@pytest.fixture
def smoke_store(smoke_store_template, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(smoke_store_template, tmp_path / "store"))


def check_train_files_documented(store_root: Path, placeholder: str, name_regex: str,
                                 extra: tuple[str, ...] = ()) -> None:
    """storage_layout.md's ``train/<placeholder>/...`` rows (plus the ``extra`` file rows) match exactly the files
    under ``store_root/train``."""
    import re

    doc = (Path(__file__).resolve().parents[1] / "storage_layout.md").read_text()
    patterns = []
    for line in doc.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and (cells[0].startswith(f"train/{placeholder}") or cells[0] in extra):
            regex = re.escape(cells[0]).replace(re.escape(placeholder), name_regex)
            patterns.append(re.compile("^" + regex.replace(re.escape("<N>"), r"\d{8}") + "$"))
    written = [str(p.relative_to(store_root)) for p in (store_root / "train").rglob("*") if p.is_file()]
    for f in written:
        assert any(p.match(f) for p in patterns), f"{f} is written but not documented in storage_layout.md"
    for p in patterns:
        assert any(p.match(f) for f in written), f"{p.pattern} documented but not written"
