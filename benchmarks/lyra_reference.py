"""Load Lyra's own warping code (Lyra-1 ``forward_warp_utils_pytorch.py`` and its NVIDIA Warp ray-cast kernel
``ray_triangle_intersection_warp.py``) out of a local copy of its public repository, at run time, for the
benchmarks. Nothing of Lyra's code is part of this repository.

Getting the copy (any one of these; the benchmarks take ``--reference PATH`` or the ``LYRA_REFERENCE``
environment variable, default ``~/.cache/lyra-reference``):

    git clone https://github.com/nv-tlabs/lyra ~/.cache/lyra-reference
    python benchmarks/lyra_reference.py --from-git-dir /path/to/lyra/.git [--commit SHA]   # git archive of
        # the two files (and a COMMIT file) into ~/.cache/lyra-reference, from a clone or bare mirror

plus ``pip install warp-lang`` (its ray-cast kernel is NVIDIA Warp code; ``pip install -e .[bench]``).

The two files import only torch, numpy and ``warp`` at module level, so nothing is stubbed: they are loaded as
the modules of a synthetic package (so the kernel module's relative import resolves) and run unmodified. One
adaptation, on machines without CUDA only: ``warp.launch`` is wrapped, in this process, so that it runs on
"cpu" the kernels that Lyra's code sends to the ``cuda:0`` it names when the torch device has no index (the
tensors it passes are then CPU tensors); the kernels themselves are compiled from Lyra's source unchanged.
Warp's CPU backend runs a kernel on one thread, whatever torch's thread count.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

INFERENCE_DIR = "Lyra-1/cosmos_predict1/diffusion/inference"
FILES = ("forward_warp_utils_pytorch.py", "ray_triangle_intersection_warp.py")
DEFAULT_PATH = Path(os.environ.get("LYRA_REFERENCE", "~/.cache/lyra-reference")).expanduser()
_PACKAGE = "_lyra_reference_inference"

HOW_TO_GET = (
    "Lyra's reference code is not available: {reason}. Get a copy of the public repository nv-tlabs/lyra with "
    "`git clone https://github.com/nv-tlabs/lyra {path}` (or, from an existing clone or mirror, `python "
    "benchmarks/lyra_reference.py --from-git-dir GIT_DIR`), `pip install warp-lang`, and pass --reference PATH "
    "or set LYRA_REFERENCE."
)


@dataclass(frozen=True)
class Reference:
    """Lyra's loaded modules and where they came from."""

    warp_utils: types.ModuleType  # forward_warp_utils_pytorch
    path: Path
    commit: str | None
    cpu_kernel_proxy: bool  # True where wp.launch was redirected from cuda:0 to the CPU


def commit_of(path: Path) -> str | None:
    """The commit of the copy: its COMMIT file (written by --from-git-dir) or ``git rev-parse HEAD``."""
    marker = path / "COMMIT"
    if marker.is_file():
        return marker.read_text().strip() or None
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def missing_reason(path: Path) -> str | None:
    """Why the reference cannot be loaded from ``path`` (None if it can)."""
    for name in FILES:
        if not (path / INFERENCE_DIR / name).is_file():
            return f"{path / INFERENCE_DIR / name} does not exist"
    if importlib.util.find_spec("warp") is None:
        return "the `warp-lang` package (NVIDIA Warp, for Lyra's ray-cast kernel) is not installed"
    return None


def _launch_on_cpu(launch):
    """``warp.launch`` that runs on the CPU what Lyra's code sends to ``cuda:0`` (there is no GPU)."""

    def cpu_launch(*args, **kwargs):
        kwargs["device"] = "cpu"
        return launch(*args, **kwargs)

    cpu_launch.lyra_reference_cpu = True
    return cpu_launch


def load(path: Path | str = DEFAULT_PATH) -> Reference:
    """Import Lyra's two files from the copy at ``path``; raises FileNotFoundError (with how to get it)."""
    path = Path(path).expanduser()
    reason = missing_reason(path)
    if reason is not None:
        raise FileNotFoundError(HOW_TO_GET.format(reason=reason, path=path))
    import torch
    import warp

    directory = path / INFERENCE_DIR
    package = types.ModuleType(_PACKAGE)
    package.__path__ = [str(directory)]
    sys.modules[_PACKAGE] = package
    warp.config.quiet = True
    _load_module(f"{_PACKAGE}.ray_triangle_intersection_warp", directory / FILES[1])
    proxy = not torch.cuda.is_available()
    if proxy and not getattr(warp.launch, "lyra_reference_cpu", False):
        warp.launch = _launch_on_cpu(warp.launch)
    utils = _load_module(f"{_PACKAGE}.forward_warp_utils_pytorch", directory / FILES[0])
    return Reference(utils, path, commit_of(path), proxy)


def _load_module(name: str, file: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_or_explain(path: Path | str | None) -> Reference | None:
    """``load``, or None after printing why not and how to get the copy (the benchmarks then skip Lyra)."""
    try:
        return load(DEFAULT_PATH if path is None else path)
    except FileNotFoundError as e:
        print(f"SKIPPED (Lyra's own code): {e}")
        return None


def extract(git_dir: str, dest: Path, commit: str | None = None) -> str:
    """``git archive`` the two files of ``commit`` (default HEAD) from ``git_dir`` into ``dest``; returns the
    commit and records it in ``dest/COMMIT``."""
    sha = subprocess.run(["git", "--git-dir", git_dir, "rev-parse", f"{commit or 'HEAD'}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "--git-dir", git_dir, "archive", sha, *[f"{INFERENCE_DIR}/{f}" for f in FILES]],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (dest / "COMMIT").write_text(sha + "\n")
    return sha


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-git-dir", required=True, help="a clone's .git or a bare mirror of nv-tlabs/lyra")
    ap.add_argument("--commit", default=None, help="commit to extract (default HEAD)")
    ap.add_argument("--dest", default=str(DEFAULT_PATH))
    args = ap.parse_args()
    sha = extract(args.from_git_dir, Path(args.dest).expanduser(), args.commit)
    print(f"extracted {', '.join(FILES)} of nv-tlabs/lyra {sha} into {args.dest}")


if __name__ == "__main__":
    main()
