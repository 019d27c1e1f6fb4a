"""What integrity costs: `lyra verify` throughput beside this machine's raw crc32c speed, and the crc32c codec's
cost on a smoke store's writes and reads (issue 26).

* raw: ``google_crc32c.value`` (the library Zarr's crc32c codec calls) over a 64 MB buffer;
* verify: :func:`lyra_pipeline.store.verify.verify_store` on ``--store`` (every chunk of every finished unit
  read and checked), bytes checked / second, best of ``--repeats`` (page cache warm after the first);
* codec: every array of ``--store``'s first scenes written into a fresh local store with the store's codecs
  (zstd + crc32c, every chunk written) and with zstd alone (chunks equal to the fill value skipped: the old
  format), then read back whole, interleaved ``--repeats`` times; the ratio of the medians.

    python benchmarks/bench_verify.py --store lyra_store [--scenes 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from lyra_pipeline.store.runstore import CHUNK_COMPRESSORS, RunStore
from lyra_pipeline.store.verify import verify_store

ROOT = Path(__file__).resolve().parents[1]


def raw_crc_mb_s(size: int = 64 << 20, repeats: int = 5) -> float:
    buf = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    best = min(_timed(lambda: google_crc32c.value(buf)) for _ in range(repeats))
    return size / 1e6 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def write_all(root: Path, data: dict[tuple[str, str], tuple[np.ndarray, tuple]], checksummed: bool) -> float:
    """Seconds to write every array into a fresh store at ``root`` (store codecs, or zstd alone and empty
    chunks skipped: the format before checksums)."""
    shutil.rmtree(root, ignore_errors=True)
    group = zarr.open_group(store=zarr.storage.LocalStore(str(root)), mode="w")
    compressors = CHUNK_COMPRESSORS if checksummed else (ZstdCodec(level=0, checksum=False),)
    t0 = time.perf_counter()
    with zarr.config.set({"array.write_empty_chunks": checksummed}):
        for (sid, name), (arr, chunks) in data.items():
            z = group.create_array(f"{sid}/{name}", shape=arr.shape, dtype=arr.dtype, chunks=chunks,
                                   compressors=compressors, overwrite=True)
            z[...] = arr
    return time.perf_counter() - t0


def read_all(root: Path, names: list[tuple[str, str]], checked: bool) -> float:
    """Seconds to read every array back whole: ``checked`` as ``RunStore.read_array`` reads (chunk files listed
    against the chunk grid, then decoded through zstd + crc32c), else plain Zarr."""
    group = zarr.open_group(store=zarr.storage.LocalStore(str(root)), mode="r")
    t0 = time.perf_counter()
    for sid, name in names:
        arr = group[f"{sid}/{name}"]
        if checked:
            base = root / sid / name
            present = {p.relative_to(base).as_posix() for p in (base / "c").rglob("*") if p.is_file()}
            missing = [k for k in RunStore.chunk_keys(arr) if k not in present]
            assert not missing, missing
        np.asarray(arr[...])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--scenes", type=int, default=2, help="scenes whose arrays the codec comparison writes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "verify_cpu.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    store = RunStore(args.store, create=False)
    raw = raw_crc_mb_s()
    runs = [verify_store(store) for _ in range(args.repeats)]
    best = min(runs, key=lambda r: r.seconds)
    assert not best.damage, [d.line() for d in best.damage]
    data = {}
    for sid in store.scene_ids()[:args.scenes]:
        for name, arr in store.list_arrays(sid).items():
            data[(sid, name)] = (store.read_array(sid, name), tuple(arr.chunks))
    nbytes = sum(a.nbytes for a, _ in data.values())
    times: dict[str, list[float]] = {k: [] for k in ("write_crc", "write_plain", "read_crc", "read_plain")}
    with tempfile.TemporaryDirectory() as tmp:
        crc_root, plain_root = Path(tmp) / "crc", Path(tmp) / "plain"
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            times["write_crc"].append(write_all(crc_root, data, True))
            times["write_plain"].append(write_all(plain_root, data, False))
            times["read_crc"].append(read_all(crc_root, list(data), True))
            times["read_plain"].append(read_all(plain_root, list(data), False))
        on_disk = {k: sum(p.stat().st_size for p in r.rglob("*") if p.is_file())
                   for k, r in (("crc", crc_root), ("plain", plain_root))}
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "store": args.store, "machine": f"{os.cpu_count()} cores",
        "raw_crc32c_mb_s": raw,
        "verify": {"scenes": best.scenes, "units": best.units, "arrays": best.arrays, "chunks": best.chunks,
                   "mb": best.bytes / 1e6, "seconds_best": best.seconds,
                   "seconds_all": [r.seconds for r in runs], "mb_s": best.mb_per_s},
        "codec": {"scenes": args.scenes, "arrays": len(data), "raw_mb": nbytes / 1e6,
                  "on_disk_mb": {k: v / 1e6 for k, v in on_disk.items()},
                  "median_s": med, "write_ratio_crc_over_plain": med["write_crc"] / med["write_plain"],
                  "read_ratio_checked_over_plain": med["read_crc"] / med["read_plain"], "repeats": args.repeats},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
