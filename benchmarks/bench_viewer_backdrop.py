"""Benchmark: does PlayCanvas's viewer show its own background through an export?

For each scene, ``export-ply --html`` is written twice, with the default ``--backdrop auto`` and with
``--backdrop none``, and each viewer's background is set to a colour no scene contains (magenta, 1 0 1) instead
of the decoder's. Headless Chromium (software WebGL) screenshots each viewer at the input camera at twice the
frame size. Measured: the share of pixels within 8/255 of magenta (holes, where the background shows alone) and
the PSNR of the screenshot against our own render of the input view over the decoder's background (what shows
through semi-transparent Gaussians tints the whole picture: measured, no pure-magenta pixel, but pink walls).
Screenshots land beside the JSON (``<scene>_<backdrop>.png``) to be looked at. Never asserts.

    python benchmarks/bench_viewer_backdrop.py --store /work/data/d12 --scenes proc-000001,proc-000002
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lyra_ops.distill import background_color  # noqa: E402
from lyra_ops.gaussians import Gaussians  # noqa: E402
from lyra_ops.metrics import psnr  # noqa: E402
from lyra_pipeline.quality import render_gaussians  # noqa: E402
from lyra_pipeline.reconstruct import (  # noqa: E402
    ExportOptions,
    splat_transform,
    viewer_screenshot,
    viewer_settings,
    write_scene,
)
from lyra_pipeline.shipped import shipped_decoder  # noqa: E402
from lyra_pipeline.storage import RunStore  # noqa: E402
from lyra_pipeline.training import ViewCache, scene_trajectories  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAGENTA = [1.0, 0.0, 1.0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--scenes", required=True)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "viewer_backdrop.json"))
    ap.add_argument("--work", default="/tmp/viewer_backdrop")
    args = ap.parse_args()
    torch.set_num_threads(2)
    store = RunStore(args.store, create=False)
    model, source = shipped_decoder()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shots_dir = Path(args.out).with_suffix("")
    shots_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for scene in args.scenes.split(","):
        views = ViewCache(store)
        first = views.get(scene, scene_trajectories(store, scene)[0])
        for backdrop in ("auto", "none"):
            ply = work / f"{scene}_{backdrop}.ply"
            res = write_scene(model, source, store, scene, ply, strip=False,
                              options=ExportOptions(backdrop=backdrop))
            cams = first.cameras  # the viewer settings export-ply writes, with a background no scene has
            settings = viewer_settings(cams.c2w[0], cams.K[0], cams.height, cams.width, tuple(MAGENTA))
            settings_path = ply.with_suffix(".viewer.json")
            settings_path.write_text(json.dumps(settings))
            html = splat_transform(ply, ply.with_suffix(".html"), "-E", str(settings_path))
            h, w = 2 * cams.height, 2 * cams.width
            shot = viewer_screenshot(html, w, h, timeout_s=90.0, settle_ms=3000)
            Image.fromarray(shot).save(shots_dir / f"{scene}_{backdrop}.png")
            shot_t = torch.from_numpy(shot.copy()).permute(2, 0, 1).float() / 255
            leak = float(((shot_t - torch.tensor(MAGENTA)[:, None, None]).abs().max(dim=0).values < 8 / 255)
                         .float().mean())
            ours = render_gaussians(Gaussians.from_ply(ply), cams[torch.tensor([0])].resized(h, w),
                                    background=background_color(first.frames[0], model.config.background)).rgb
            row = {"scene": scene, "backdrop": backdrop, "gaussians": res.gaussians, "magenta_share": leak,
                   "psnr_vs_our_render": float(psnr(shot_t[None], ours))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"store": args.store, "decoder": source, "viewer_background": MAGENTA,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
