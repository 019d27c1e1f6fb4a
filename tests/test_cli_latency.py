"""Errors in seconds (issue 28 item 5): the CLI checks arguments and input files before it loads torch, Prefect,
Zarr or the model libraries. Guarded by what a fresh interpreter has imported (sys.modules), not by timings;
``benchmarks/bench_cli_latency.py`` measures the seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lyra_pipeline.cli import app

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "lyra_pipeline" / "examples"
NEVER_ON_IMPORT = ("torch", "prefect", "diffusers", "transformers", "zarr", "pyarrow", "dask", "matplotlib")
NEVER_BEFORE_VALIDATION = ("torch", "prefect", "diffusers", "transformers", "dask", "matplotlib", "viser", "asyncpg")


def _fresh_python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("module", ["lyra_pipeline", "lyra_pipeline.cli", "lyra_pipeline.__main__"])
def test_importing_the_cli_loads_no_heavy_library(module):
    proc = _fresh_python(f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))")
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    assert not [m for m in NEVER_ON_IMPORT if m in loaded], f"import {module} loads {loaded & set(NEVER_ON_IMPORT)}"


MISSING, EMPTY = "no_such_store", "empty_store"
ERRORS = [  # (arguments, what the one error line says)
    (["run", "--preset", "bogus"], "unknown preset 'bogus'"),
    (["run", "--images", "missing_folder"], "images folder not found"),
    (["stage", "warpp", "--preset", "smoke"], "unknown stage 'warpp'"),
    (["evaluate", "--store", MISSING], "no lyra store there"),
    (["status", "--store", MISSING], "not a lyra store"),
    (["train", "--store", EMPTY, "--preset", "bogus"], "unknown training preset 'bogus'"),
    (["train", "--store", EMPTY, "--config", "train.yaml"], "unknown config key 'optim.lrr'"),
    (["train", "--store", EMPTY, "--nnodes", "2"], "--rdzv-endpoint None"),
    (["train-teacher", "--store", EMPTY, "--preset", "bogus"], "unknown teacher preset 'bogus'"),
    (["export-ply", "nosuch", "--store", EMPTY], "no scene 'nosuch'"),
    (["refine", "nosuch", "--store", MISSING], "not a lyra store"),
    (["refine", "nosuch", "--store", EMPTY, "--steps", "0"], "--steps: expected an integer >= 1"),
    (["reconstruct", "--image", "missing.png"], "missing.png: image not found"),
    (["reconstruct", "--prompt", "a red chair"], "lyra example-config text_prompts"),
    (["view", "missing.ply"], "missing.ply: file not found"),
    (["report", "--store", MISSING], "not a lyra store"),
    (["server", "start", "--db-url", "mysql://db/lyra"], "database URL 'mysql://db/lyra'"),
    (["example-config", "bogus"], "example config 'bogus': no such example"),
]

# one fresh interpreter runs every case in turn and says, after each, which heavy libraries are loaded by then
_RUN_CASES = """
import json, sys
from typer.testing import CliRunner
from lyra_pipeline.cli import app
heavy = {heavy!r}
for args in {cases!r}:
    res = CliRunner().invoke(app, args)
    print(json.dumps({{"args": args, "exit": res.exit_code, "output": res.output,
                       "heavy": [m for m in heavy if m in sys.modules]}}), flush=True)
"""


def test_input_errors_are_one_line_before_any_heavy_import(tmp_path):
    """Every case exits 2 with one ``error:`` line naming the mistake, and none of them has loaded torch, Prefect,
    the model libraries or matplotlib by the time it answered (they load only once the inputs passed)."""
    from lyra_pipeline.store.runstore import RunStore

    RunStore(tmp_path / EMPTY)
    (tmp_path / "train.yaml").write_text("optim:\n  lrr: 0.1\n")
    proc = _fresh_python(_RUN_CASES.format(heavy=NEVER_BEFORE_VALIDATION, cases=[a for a, _ in ERRORS]), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(ERRORS)
    for (args, says), res in zip(ERRORS, results, strict=True):
        lines = [line for line in res["output"].strip().splitlines() if line.strip()]
        assert res["exit"] == 2, (args, res["output"])
        assert lines[0].startswith("error:") and says in res["output"], (args, res["output"])
        if args[0] != "train" or "--config" not in args:  # a config's key errors list the valid keys below
            assert len(lines) == 1, (args, res["output"])
        assert "Traceback" not in res["output"], (args, res["output"])
        assert res["heavy"] == [], f"lyra {' '.join(args)} loaded {res['heavy']} before answering"
    assert not (tmp_path / "lyra_store").exists() and not (tmp_path / MISSING).exists()


STORE_ERRORS = [  # a missing store or an unknown scene: answered from the folder, before Zarr and Arrow load
    (["run", "--images", "missing_folder"], "missing_folder: images folder not found"),
    (["run", "--config", "missing.yaml"], "missing.yaml: config file not found"),
    (["status", "--store", MISSING], "no_such_store: not a lyra store (no store.json)"),
    (["report", "--store", MISSING], "no_such_store: not a lyra store (no store.json)"),
    (["evaluate", "--store", MISSING], "no_such_store: no lyra store there (no store.json)"),
    (["retry", "--store", MISSING], "no_such_store: no lyra store there (no store.json)"),
    (["export-ply", "nosuch", "--store", EMPTY], "empty_store: no scene 'nosuch'; scenes: none"),
    (["export-ply", "proc-000000", "--store", MISSING], "no_such_store: not a lyra store (no store.json)"),
    (["refine", "nosuch", "--store", MISSING], "no_such_store: not a lyra store (no store.json)"),
    (["inspect", "nosuch", "--store", EMPTY], "empty_store: no scene 'nosuch'; scenes: none"),
    (["verify", "--store", EMPTY, "--scene", "nosuch"], "--scene: empty_store has no scene(s) ['nosuch']"),
    (["view", "nosuch", "--store", EMPTY], "nor a scene of empty_store (its scenes: none)"),
    (["train", "--store", MISSING], "no_such_store: not a lyra store (no store.json)"),
    (["train", "--store", EMPTY, "--preset", "bogus"], "unknown training preset 'bogus'"),
    (["train", "--store", EMPTY, "--nnodes", "2"], "--rdzv-endpoint None"),
    (["train-teacher", "--store", EMPTY, "--preset", "bogus"], "unknown teacher preset 'bogus'"),
]


def test_store_errors_are_answered_before_zarr_loads(tmp_path):
    """The commands that open a store name a missing one or an unknown scene without importing Zarr or Arrow
    (about 1-2 s of the 3 s on a loaded 2-core machine), with the words RunStore itself uses."""
    from lyra_pipeline.store.runstore import RunStore

    RunStore(tmp_path / EMPTY)
    proc = _fresh_python(_RUN_CASES.format(heavy=("zarr", "pyarrow", *NEVER_BEFORE_VALIDATION),
                                           cases=[a for a, _ in STORE_ERRORS]), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    for (args, says), res in zip(STORE_ERRORS, results, strict=True):
        lines = [line for line in res["output"].strip().splitlines() if line.strip()]
        assert res["exit"] == 2 and len(lines) == 1 and says in lines[0], (args, res["output"])
        assert res["heavy"] == [], f"lyra {' '.join(args)} loaded {res['heavy']} before answering"
    with pytest.raises(Exception, match=r"^no_such_store: not a lyra store \(no store.json\)$"):
        RunStore(MISSING, create=False)  # the same words as the early check's
    assert not (tmp_path / MISSING).exists()


def test_a_listed_scene_is_confirmed_by_the_store(tmp_path, monkeypatch):
    """The folder listing only answers "no such scene"; a scene it lists is still looked up through RunStore."""
    import lyra_pipeline.cli as cli
    from lyra_pipeline.store.runstore import RunStore

    RunStore(tmp_path / "s")
    assert cli._local_scene_ids(tmp_path / "s") == []
    (tmp_path / "s" / "scenes.zarr" / "listed").mkdir(parents=True)
    (tmp_path / "s" / "scenes.zarr" / "listed" / "zarr.json").write_text("{}")
    assert cli._local_scene_ids(tmp_path / "s") == ["listed"]
    assert cli._local_scene_ids("s3://bucket/store") is None
    asked = []

    class Store:  # what RunStore answers: no such scene after all
        def __init__(self, url, create=True):
            asked.append(url)

        def scene_ids(self):
            return []

    monkeypatch.setattr(cli, "RunStore", Store)
    with pytest.raises(Exception, match="no scene 'listed'"):
        cli._stored_scene(str(tmp_path / "s"), "listed")
    assert asked == [str(tmp_path / "s")]


def test_stage_names_are_the_scene_tasks():
    """`lyra stage` checks the name against the store's stage list before tasks.sdg (Prefect, torch) loads."""
    from lyra_pipeline.store.names import STAGES
    from tasks.sdg import SCENE_TASKS

    assert tuple(SCENE_TASKS) == STAGES


def test_example_configs_are_package_data_and_printable(tmp_path):
    """Every shipped example is covered by pyproject's package-data globs (a wheel has it), the source checkout's
    configs/ entries are the same files, and `lyra example-config NAME --out FILE` writes its bytes."""
    from lyra_pipeline.example_configs import example_names

    files = {p.relative_to(REPO / "lyra_pipeline") for p in EXAMPLES.rglob("*.yaml")}
    assert len(files) >= 6
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lyra_pipeline"]
    packaged = {p.relative_to(REPO / "lyra_pipeline") for g in globs for p in (REPO / "lyra_pipeline").glob(g)}
    assert files <= packaged, files - packaged
    assert sorted(str(f.with_suffix("")).removeprefix("examples/") for f in files) == example_names()
    for name in ("text_prompts", "wan_local", "lyra_compat", "train/fuse"):
        assert (REPO / "configs" / f"{name}.yaml").resolve() == (EXAMPLES / f"{name}.yaml").resolve()
    res = CliRunner().invoke(app, ["example-config"])
    assert res.exit_code == 0 and all(name in res.output for name in example_names()), res.output
    out = tmp_path / "t2i.yaml"
    res = CliRunner().invoke(app, ["example-config", "text_prompts", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes() == (EXAMPLES / "text_prompts.yaml").read_bytes()
    res = CliRunner().invoke(app, ["example-config", "text_prompts", "--out", str(out)])
    assert res.exit_code == 2 and "nothing is overwritten" in res.output
    res = CliRunner().invoke(app, ["example-config", "text_prompt"])
    assert res.exit_code == 2 and "did you mean 'text_prompts'" in res.output


def test_help_and_errors_name_no_source_checkout_path():
    """Help texts and the text-to-3D error name `lyra example-config`, never a configs/ path (absent after pip
    install)."""
    from lyra_pipeline.config import TEXT_TO_IMAGE_HELP

    assert "configs/" not in TEXT_TO_IMAGE_HELP and "lyra example-config text_prompts" in TEXT_TO_IMAGE_HELP
    res = CliRunner().invoke(app, ["reconstruct", "--help"], terminal_width=200)
    assert res.exit_code == 0 and "configs/" not in res.output and "example-config" in res.output, res.output
