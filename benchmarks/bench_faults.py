"""Fault campaign (issue 26): damage a smoke store every way we know, then `lyra verify --repair` + `lyra run`.

Per backend (a local folder, and S3 on a moto server), against a reference store made once by `lyra run`
(preset smoke, 2 scenes, 48x80, 9 frames, 3 paths):

* ``kill9``      a `lyra run` from scratch killed with SIGKILL at a random moment;
* ``sigint``     the same run stopped with SIGINT (Ctrl-C) to its process group: exit 130, one ``interrupted:``
                 line, no unit left ``failed`` or ``running``;
* ``corrupt``    random bytes written over part of a random chunk of a random finished unit's array;
* ``delete``     a random chunk file deleted;
* ``parquet``    a manifest file, the scene list or the manifest index overwritten with garbage;
* ``mismatch``   a command run with a config that changes the store's scene list: refused (exit 2), the store
                 byte-identical.

After each fault: `lyra verify --repair` (detected = it names the damaged chunk / file; kills and interrupts
leave no damage, only pending units), `lyra run`, `lyra verify`; then the store is compared with the reference:
arrays (every file under scenes.zarr) bit-identical, tables equal less run ids and timestamps (manifest rows
scene/trajectory/stage/status/key, prompts.parquet and dataset.json bytes). Any "Traceback" or "Logging error" in
any command's output is counted. Results: benchmarks/results/faults.json.

    python benchmarks/bench_faults.py [--backends local s3] [--kills 20 --sigints 10 --corrupt 20 --delete 10
                                       --parquet 5 --mismatch 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"preset": "smoke", "video": {"height": 48, "width": 80, "num_frames": 9},
         "trajectories": {"names": ["left", "zoom_in", "clockwise"]}}
NOISE = ("Traceback", "Logging error")


class Backend:
    """Where stores live: a local folder or a moto S3 bucket (``url(name)``), with raw file access."""

    def __init__(self, kind: str, workdir: Path, env: dict[str, str]) -> None:
        self.kind, self.workdir, self.env = kind, workdir, env
        if kind == "s3":
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            self.fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
        else:
            self.fs = fsspec.filesystem("file", auto_mkdir=True)

    def url(self, name: str) -> str:
        return f"s3://lyra/{name}" if self.kind == "s3" else str(self.workdir / name)

    def path(self, url: str) -> str:
        return url.removeprefix("s3://")

    def files(self, url: str) -> dict[str, bytes]:
        root = self.path(url)
        self.fs.invalidate_cache()
        found = [p for p in self.fs.find(root) if not p.endswith("/")]
        data = self.fs.cat(found) if found else {}
        return {p[len(root.rstrip("/")) + 1:] if p.startswith(root.rstrip("/")) else p: v for p, v in data.items()}

    def copy(self, src: str, dst: str) -> None:
        self.remove(dst)
        for rel, data in self.files(src).items():
            if not rel.startswith(("leases/", "runs/")):
                self.fs.pipe_file(f"{self.path(dst)}/{rel}", data)

    def remove(self, url: str) -> None:
        if self.fs.exists(self.path(url)):
            self.fs.rm(self.path(url), recursive=True)
        self.fs.invalidate_cache()


def lyra(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lyra_pipeline", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def noisy(*outputs: str) -> bool:
    return any(n in o for o in outputs for n in NOISE)


def manifest_units(files: dict[str, bytes]) -> list[tuple]:
    rows = []
    for rel, data in files.items():
        if rel.startswith("manifest/") and rel.endswith(".parquet"):
            for r in pq.read_table(io.BytesIO(data)).to_pylist():
                rows.append((r["scene_id"], r["trajectory"], r["stage"], r["status"], r["key"]))
    return sorted(rows)


def compare(backend: Backend, url: str, reference: dict[str, bytes]) -> dict[str, bool]:
    files = backend.files(url)
    arrays = {k: hashlib.sha256(v).hexdigest() for k, v in files.items() if k.startswith("scenes.zarr/")}
    ref_arrays = {k: hashlib.sha256(v).hexdigest() for k, v in reference.items() if k.startswith("scenes.zarr/")}
    tables = (manifest_units(files) == manifest_units(reference)
              and files.get("prompts.parquet") == reference.get("prompts.parquet")
              and files.get("dataset.json") == reference.get("dataset.json"))
    return {"arrays_identical": arrays == ref_arrays, "tables_equal": tables,
            "no_leases": not any(k.startswith("leases/") for k in files)}


def done_units(url: str) -> int:
    from lyra_pipeline.storage import RunStore

    try:
        return sum(r["status"] == "done" for r in RunStore(url, create=False).read_manifest().to_pylist())
    except Exception:  # noqa: BLE001 - not there yet, or a file being replaced
        return 0


def _terminal_signals() -> None:
    """The child gets SIGINT / SIGTERM as from a terminal (a campaign started in the background, e.g. under
    `nohup ... &`, would otherwise pass on an ignored SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_until(args: list[str], env: dict[str, str], url: str, units: int, extra_s: float,
              sig: int) -> tuple[int, str, float, int]:
    """Start `lyra ARGS`; once ``units`` units are done in ``url``, wait ``extra_s`` and send ``sig`` to its
    process group. Returns (exit code, output, seconds to exit after the signal, units done at the signal)."""
    proc = subprocess.Popen([sys.executable, "-m", "lyra_pipeline", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
                            preexec_fn=_terminal_signals)
    done = 0
    while proc.poll() is None:
        done = done_units(url)
        if done >= units:
            time.sleep(extra_s)
            break
        time.sleep(0.1)
    sent = time.time()
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out + err, time.time() - sent, done


def campaign(backend: Backend, counts: dict[str, int], rng: random.Random, cfg: Path, log) -> dict:
    env = backend.env
    ref = backend.url("reference")
    backend.remove(ref)
    t0 = time.time()
    proc = lyra(["run", "--config", str(cfg), "--store", ref], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full_s = time.time() - t0
    reference = backend.files(ref)
    total_units = len(manifest_units(reference))
    chunks = sorted(k for k in reference if k.startswith("scenes.zarr/") and "/c/" in k)
    tables = sorted(k for k in reference if k.startswith("manifest/")) + ["prompts.parquet", "manifest_index.parquet"]
    results: dict[str, list[dict]] = defaultdict(list)
    work = backend.url("work")
    log(f"[{backend.kind}] reference store: {len(reference)} files, {len(chunks)} chunks, run {full_s:.1f} s")

    def repair_and_run(trial: dict, expect_damage: bool, name: str = "", again: list[str] | None = None) -> None:
        """`lyra verify --repair` (it reports what it finds first: detected = the damaged chunk / file named, or
        for kills and interrupts no damage at all), `lyra run` (``again``: the interrupted command itself, as its
        user re-runs it), then `lyra verify` again and the comparison."""
        if backend.fs.exists(f"{backend.path(work)}/store.json"):
            r = lyra(["verify", "--store", work, "--repair"], env)
        else:  # stopped before the store existed: nothing to verify
            r = subprocess.CompletedProcess([], 0, "no store yet: no damage", "")
        said = r.stdout + r.stderr
        trial["detected"] = ("DAMAGED" in said and (not name or name in said)) if expect_damage \
            else "no damage" in said
        trial["repair_rc"] = r.returncode
        runs = lyra(again or ["run", "--store", work], env)
        trial["run_rc"] = runs.returncode
        after = lyra(["verify", "--store", work], env)
        trial["clean_after"] = after.returncode == 0
        trial["repaired"] = r.returncode == 0 and runs.returncode == 0 and after.returncode == 0
        trial.update(compare(backend, work, reference))
        trial["traceback"] = noisy(r.stdout, r.stderr, runs.stdout, runs.stderr, after.stdout, after.stderr)

    for kind, sig in (("kill9", signal.SIGKILL), ("sigint", signal.SIGINT)):
        for i in range(counts[kind]):
            backend.remove(work)
            units, extra = rng.randrange(total_units), rng.uniform(0.0, 0.5)
            rc, output, exit_s, done = run_until(["run", "--config", str(cfg), "--store", work], env, work, units,
                                                 extra, sig)
            trial = {"after_units": units, "plus_s": round(extra, 2), "done_at_signal": done, "rc": rc,
                     "exit_s": round(exit_s, 2), "injected": rc != 0}
            if kind == "sigint" and rc == 130:
                trial["one_line"] = sum(line.startswith("interrupted:") for line in output.splitlines()) == 1
                files = backend.files(work) if backend.fs.exists(backend.path(work)) else {}
                statuses = Counter(u[3] for u in manifest_units(files))
                trial["failed_or_running_after"] = statuses["failed"] + statuses["running"]
            trial["traceback_at_signal"] = kind == "sigint" and noisy(output)
            repair_and_run(trial, expect_damage=False, again=["run", "--config", str(cfg), "--store", work])
            results[kind].append(trial)
            log(f"[{backend.kind}] {kind} {i}: {trial}")
    for kind in ("corrupt", "delete"):
        for i in range(counts[kind]):
            backend.copy(ref, work)
            rel = rng.choice(chunks)
            path = f"{backend.path(work)}/{rel}"
            if kind == "corrupt":
                data = bytearray(reference[rel])
                lo = rng.randrange(len(data))
                n = rng.randint(1, max(1, min(64, len(data) - lo)))
                data[lo:lo + n] = bytes(rng.randrange(256) for _ in range(n))
                if bytes(data) == reference[rel]:
                    data[lo] ^= 0xFF
                backend.fs.pipe_file(path, bytes(data))
            else:
                backend.fs.rm_file(path)
            trial = {"chunk": rel, "injected": True}
            chunk_key = "c/" + rel.split("/c/", 1)[1]
            repair_and_run(trial, expect_damage=True, name=chunk_key)
            results[kind].append(trial)
            log(f"[{backend.kind}] {kind} {i}: {trial}")
    for i in range(counts["parquet"]):
        backend.copy(ref, work)
        rel = tables[i % len(tables)] if i < len(tables) else rng.choice(tables)
        backend.fs.pipe_file(f"{backend.path(work)}/{rel}", bytes(rng.randrange(256) for _ in range(200)))
        trial = {"file": rel, "injected": True}
        repair_and_run(trial, expect_damage=True, name=rel)
        results["parquet"].append(trial)
        log(f"[{backend.kind}] parquet {i}: {trial}")
    mismatches = [["run", "--preset", "default"], ["stage", "warp", "--preset", "default"], ["run", "--seed", "3"],
                  ["evaluate", "--preset", "default"], ["stage", "depth", "--num-scenes", "1"],
                  ["retry", "--preset", "default"], ["run", "--num-scenes", "1"], ["stage", "input", "--seed", "9"],
                  ["evaluate", "--num-scenes", "5"], ["run", "--preset", "paper"]]
    backend.copy(ref, work)
    before = backend.files(work)
    for i in range(counts["mismatch"]):
        args = mismatches[i % len(mismatches)]
        proc = lyra([*args, "--store", work], env)
        same = backend.files(work) == before
        trial = {"command": " ".join(args), "rc": proc.returncode, "injected": True,
                 "detected": proc.returncode == 2 and "scene list" in proc.stderr, "repaired": same,
                 "arrays_identical": same, "tables_equal": same, "traceback": noisy(proc.stdout, proc.stderr)}
        results["mismatch"].append(trial)
        log(f"[{backend.kind}] mismatch {i}: {trial}")
    summary = {}
    for kind, trials in results.items():
        summary[kind] = {"injected": sum(t["injected"] for t in trials),
                         "detected": sum(bool(t.get("detected")) for t in trials),
                         "repaired": sum(bool(t.get("repaired")) for t in trials),
                         "arrays_identical": sum(bool(t.get("arrays_identical")) for t in trials),
                         "tables_equal": sum(bool(t.get("tables_equal")) for t in trials),
                         "tracebacks": sum(bool(t.get("traceback") or t.get("traceback_at_signal"))
                                           for t in trials)}
        if kind == "sigint":
            summary[kind]["exit_s_max"] = max((t["exit_s"] for t in trials), default=None)
            summary[kind]["one_line"] = sum(bool(t.get("one_line")) for t in trials if t["rc"] == 130)
            summary[kind]["exited_130"] = sum(t["rc"] == 130 for t in trials)
            summary[kind]["failed_or_running_after"] = sum(t.get("failed_or_running_after", 0) for t in trials)
    return {"reference_run_s": full_s, "chunks": len(chunks), "summary": summary, "trials": results}


def start_moto() -> tuple[object, dict[str, str]]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="lyra")
    return server, env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    for name, default in (("kills", 20), ("sigints", 10), ("corrupt", 20), ("delete", 10), ("parquet", 5),
                          ("mismatch", 10)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "faults.json")
    args = ap.parse_args()
    counts = {"kill9": args.kills, "sigint": args.sigints, "corrupt": args.corrupt, "delete": args.delete,
              "parquet": args.parquet, "mismatch": args.mismatch}
    from lyra_pipeline.server import drop_database, start_server

    out: dict = {"counts": counts, "seed": args.seed, "config": SMALL, "backends": {}}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    db_url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/lyra_faults_{os.getpid()}"
    # a Prefect server on PostgreSQL (SQLite's "database is locked" stalls of ~30 s would dominate the campaign)
    server = start_server(db_url, "127.0.0.1", port, env_overrides={"PREFECT_UI_ENABLED": "false"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_campaigns(args, counts, out, Path(tmp), f"http://127.0.0.1:{port}/api")
    finally:
        server.terminate()
        server.wait(30)
        drop_database(db_url)
    print(f"wrote {args.out}")


def run_campaigns(args, counts: dict[str, int], out: dict, tmp: Path, api_url: str) -> None:
    cfg = tmp / "small.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    base_env = {**os.environ, "PREFECT_API_URL": api_url, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for kind in args.backends:
        server = None
        env = dict(base_env)
        if kind == "s3":
            server, extra = start_moto()
            env.update(extra)
            os.environ.update(extra)
        t0 = time.time()
        try:
            backend = Backend(kind, tmp, env)
            res = campaign(backend, counts, random.Random(args.seed), cfg, lambda m: print(m, flush=True))
        finally:
            if server is not None:
                server.stop()
        res["seconds"] = time.time() - t0
        out["backends"][kind] = res
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=str))
        print(json.dumps({kind: res["summary"]}, indent=1), flush=True)


if __name__ == "__main__":
    main()
