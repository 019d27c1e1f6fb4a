"""Wall time and peak memory of `lyra run` (first run, then a re-run of the finished store), and with
``--evaluate`` of `lyra evaluate` on the finished store (its time as a ratio of the generation's).

Peak memory is the largest summed RSS of the whole process tree (the CLI and the Prefect server it starts),
sampled every 50 ms.

    python benchmarks/bench_run.py --preset smoke
    python benchmarks/bench_run.py --preset default --evaluate
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def run(args: list[str]) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lyra_pipeline.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    err = proc.stderr.read()
    if proc.returncode != 0:
        print(err[-3000:], file=sys.stderr)
    return time.perf_counter() - t0, peak / 2**20, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--store", default=None, help="default: a temporary folder, removed afterwards")
    ap.add_argument("--evaluate", action="store_true", help="also time `lyra evaluate` on the finished store")
    a = ap.parse_args()
    store = Path(a.store or tempfile.mkdtemp(prefix="lyra_bench_")) / "store"
    try:
        first = run(["run", "--preset", a.preset, "--store", str(store)])
        second = run(["run", "--preset", a.preset, "--store", str(store)])
        evaluated = run(["evaluate", "--preset", a.preset, "--store", str(store)]) if a.evaluate else None
    finally:
        if a.store is None:
            shutil.rmtree(store.parent, ignore_errors=True)
    print(f"preset={a.preset}")
    print(f"first run : {first[0]:.1f} s wall, peak RSS {first[1]:.0f} MiB (process tree), exit {first[2]}")
    print(f"re-run    : {second[0]:.1f} s wall, peak RSS {second[1]:.0f} MiB, exit {second[2]} "
          f"({second[0] / first[0]:.0%} of the first run, mostly Prefect start-up)")
    if evaluated is not None:
        print(f"evaluate  : {evaluated[0]:.1f} s wall, peak RSS {evaluated[1]:.0f} MiB, exit {evaluated[2]} "
              f"({evaluated[0] / first[0]:.2f} x the generation's wall time)")


if __name__ == "__main__":
    main()
