"""``lyra view``: a scene's Gaussians, its camera trajectories (frustums) and input image in the browser (viser).

viser is an optional dependency (``pip install 'lyra-pipeline[viewer]'``). The server binds 127.0.0.1 by default;
the page works offline (viser serves its own client bundle).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lyra_ops.cameras import Cameras
from lyra_ops.distill import background_color
from lyra_ops.errors import LyraConfigError, LyraError, LyraInputError
from lyra_ops.gaussians import Gaussians
from lyra_pipeline.storage import RunStore
from lyra_pipeline.training import is_dynamic_scene

TRAJECTORY_COLOURS = [(230, 80, 60), (60, 160, 230), (90, 200, 90), (230, 180, 40), (170, 90, 220), (40, 200, 200),
                      (220, 120, 180), (140, 140, 140)]


def _viser():
    try:
        import viser
    except ImportError as exc:
        raise LyraConfigError("the viewer needs viser: pip install 'lyra-pipeline[viewer]'") from exc
    return viser


def covariances(gaussians: Gaussians) -> np.ndarray:
    """(M,3,3) world covariances R diag(s^2) R^T of the Gaussians (quaternions w, x, y, z)."""
    w, x, y, z = gaussians.quats.detach().double().unbind(-1)
    rot = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(-1, 3, 3)  # fmt: skip
    scaled = rot * gaussians.scales.detach().double()[:, None, :]
    return (scaled @ scaled.transpose(1, 2)).float().numpy()


# viser's splat shader (viser 1.1.1, client/src/Splatting/GaussianSplatsHelpers.ts) adds 0.3 px^2 to a splat's
# screen covariance and drops the splat when ``opacity * det < 0.25`` px^4. The decoder's per-pixel input
# Gaussians (median standard deviation 0.1 px of the input frame) have det ~ 0.1 there, so in a window the size of
# the input frame every one of them vanished and only the larger teacher-frame Gaussians around the input frame
# showed (the hollow frame). :func:`display_floor` widens, for display only, each Gaussian narrower than the least
# the shader keeps at the input camera's resolution.
VISER_DILATION = 0.3  # px^2
VISER_MIN_DET = 0.25  # px^4, opacity-weighted
FLOOR_MARGIN = 0.02  # px^2 above the least kept variance (float16 rounding, sort-order slack)
FLOOR_CAP = 1.0  # px^2: fainter Gaussians are not widened further (at opacity < 0.15 viser drops them anyway)
F16_MAX = 6.0e4  # viser sends covariances as float16 (largest finite 65504; smallest normal 6.1e-5)


def floor_variance(opacities: torch.Tensor) -> torch.Tensor:
    """The least variance (px^2, per axis) that viser's splat shader keeps for a Gaussian of each opacity:
    ``opacity (v + 0.3)^2 >= 0.25``, plus :data:`FLOOR_MARGIN`, at most :data:`FLOOR_CAP`."""
    v = (VISER_MIN_DET / opacities.clamp(min=1e-6)).sqrt() - VISER_DILATION + FLOOR_MARGIN
    return v.clamp(min=0.0, max=FLOOR_CAP)


def display_floor(gaussians: Gaussians, centre: torch.Tensor, focal: float, factor: float = 1.0) -> Gaussians:
    """For display: every scale at least ``sqrt(factor * floor_variance(opacity)) * d / focal``, with d the
    Gaussian's distance from ``centre`` (the input camera) and ``focal`` its focal length in pixels, so that no
    Gaussian projects below what viser draws in a window the input frame's size (``factor`` > 1: in a window
    ``sqrt(factor)`` times smaller). Wider Gaussians are unchanged; 0: all unchanged. Measured on the smoke scene
    in ``tests/test_viewer_viser.py`` (shipped decoder): our renderer's PSNR of the floored against the decoded
    Gaussians at the input camera, 36.95 dB at the input size, 30.7 / 26.3 dB at 2x / 4x it (where the decoded
    ones leave the background visible between them and the floor closes the surfaces)."""
    if factor <= 0:
        return gaussians
    d = (gaussians.means - centre.to(gaussians.means)).norm(dim=-1, keepdim=True)
    least = (factor * floor_variance(gaussians.opacities))[:, None].sqrt() * d / float(focal)
    return Gaussians(gaussians.means, torch.maximum(gaussians.scales, least), gaussians.quats, gaussians.opacities,
                     gaussians.colors)


FLOOR_STEP = 2.0 ** 0.5  # window_floor rounds up to powers of this (a resize re-sends the splats only past a step)


def window_floor(input_focal: float, window_height: int, fov: float) -> float:
    """The :func:`display_floor` factor a browser window needs: viser draws in a canvas ``window_height`` device
    pixels high with vertical field of view ``fov`` (radians), i.e. at focal length ``h / (2 tan(fov / 2))``; a
    Gaussian floored for the input camera's ``input_focal`` projects ``(window focal / input focal)^2`` times that
    variance there, so a window smaller than the input frame (or a wider field of view, or viser's adaptive
    resolution lowering the canvas) needs ``(input focal / window focal)^2``. At least 1 (a larger window needs no
    more), rounded up to a power of :data:`FLOOR_STEP`; 1 when the window is unknown."""
    if not window_height or not fov or not 0.0 < fov < math.pi or input_focal <= 0:
        return 1.0
    focal = window_height / (2.0 * math.tan(fov / 2.0))
    need = (input_focal / focal) ** 2
    if need <= 1.0:
        return 1.0
    return FLOOR_STEP ** math.ceil(math.log(need, FLOOR_STEP) - 1e-9)


def viewer_splats(gaussians: Gaussians, centre: torch.Tensor | None = None, focal: float | None = None,
                  floor: float = 1.0) -> dict[str, np.ndarray] | None:
    """The arrays ``add_gaussian_splats`` gets (world units; :func:`add_splats` rescales them for float16); None
    for an empty set (not added). With the input camera's ``centre`` and ``focal`` (pixels), the Gaussians get
    :func:`display_floor` (``floor``: its factor); without, as given. Colours are RGB in [0, 1] (viser takes no
    spherical harmonics)."""
    if gaussians.num == 0:
        return None
    g = gaussians.detach().to("cpu")
    if centre is not None and focal is not None:
        g = display_floor(g, centre.detach().cpu(), focal, floor)
    return {"centers": g.means.float().numpy(), "covariances": covariances(g),
            "rgbs": g.colors.float().clamp(0, 1).numpy(), "opacities": g.opacities[:, None].float().clamp(0, 1).numpy()}


def add_splats(server, name: str, splats: dict[str, np.ndarray]):
    """``server.scene.add_gaussian_splats`` with the scene scaled by a power of two k (the node scaled by 1/k) so
    that the covariances, which viser sends as float16, sit mid-range: the median Gaussian's variance near 1.
    (In world units a 0.002-wide Gaussian's variance, 4e-6, is a float16 subnormal with 2-3 significant bits, and
    one 10x narrower rounds to 0.)"""
    cov = splats["covariances"]
    variance = np.trace(cov, axis1=1, axis2=2) / 3.0
    k = 2.0 ** float(np.clip(np.round(-0.5 * np.log2(max(float(np.median(variance)), 1e-30))), -60, 60))
    return server.scene.add_gaussian_splats(
        name, centers=(splats["centers"] * k).astype(np.float32),
        covariances=np.clip(cov * (k * k), -F16_MAX, F16_MAX).astype(np.float32), rgbs=splats["rgbs"],
        opacities=splats["opacities"], scale=1.0 / k,
    )  # fmt: skip


def rgbd_points(rgb: np.ndarray, depth: np.ndarray, K: np.ndarray, stride: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Point cloud of the input frame (camera = world frame): (N,3) points, (N,3) uint8 colours."""
    h, w = depth.shape
    ys, xs = np.mgrid[stride // 2 : h : stride, stride // 2 : w : stride]
    z = depth[ys, xs]
    ok = np.isfinite(z) & (z > 0)
    x = (xs + 0.5 - K[0, 2]) / K[0, 0] * z
    y = (ys + 0.5 - K[1, 2]) / K[1, 1] * z
    pts = np.stack([x[ok], y[ok], z[ok]], axis=-1).astype(np.float32)
    return pts, np.moveaxis(rgb, 0, -1)[ys[ok], xs[ok]]


def add_trajectories(server, trajectories: dict[str, Cameras], image: np.ndarray | None, every: int = 4,
                     parent: str = "") -> None:
    """Frustums (OpenCV convention, as viser's) every ``every`` frames, one colour per trajectory; the input
    image on the first camera. Under the scene node ``parent`` ("" : the root)."""
    viser = _viser()
    for i, (name, cams) in enumerate(sorted(trajectories.items())):
        colour = TRAJECTORY_COLOURS[i % len(TRAJECTORY_COLOURS)]
        fov = float(2 * np.arctan(cams.height / (2 * float(cams.K[0, 1, 1]))))
        for f in range(0, len(cams), every):
            c2w = cams.c2w[f].double().numpy()
            server.scene.add_camera_frustum(
                f"{parent}/trajectories/{name}/{f:03d}", fov=fov, aspect=cams.width / cams.height, scale=0.05,
                thickness=0.004, color=colour, wxyz=viser.transforms.SO3.from_matrix(c2w[:3, :3]).wxyz,
                position=c2w[:3, 3],
            )  # fmt: skip
    if image is not None and trajectories:
        cams = next(iter(trajectories.values()))
        fov = float(2 * np.arctan(cams.height / (2 * float(cams.K[0, 1, 1]))))
        server.scene.add_camera_frustum(f"{parent}/input", fov=fov, aspect=cams.width / cams.height, scale=0.25,
                                        thickness=0.004, color=(255, 255, 255), image=image)


def scene_content(st: RunStore, scene: str, arrays: dict, checkpoint: str | Path | None,
                  log: Callable[[str], None] | None = None) -> tuple[Gaussians | None, tuple | None, str]:
    """(decoder Gaussians, None, note) of a stored scene, or (None, input RGB-D points, note) when no decoder is
    available and the scene has depth. An explicit ``checkpoint`` that fails to load raises (no fallback)."""
    gaussians, points, note, _ = scene_view(st, scene, arrays, checkpoint, log)
    return gaussians, points, note


def scene_view(st: RunStore, scene: str, arrays: dict, checkpoint: str | Path | None,
               log: Callable[[str], None] | None = None) -> tuple[Gaussians | None, tuple | None, str, str | None]:
    """:func:`scene_content` and the background the decoder's Gaussians were trained over
    (:data:`lyra_ops.decoder.BACKGROUNDS`; None for the point cloud)."""
    from lyra_pipeline.reconstruct import decode_scene, resolve_decoder

    try:
        model, source = resolve_decoder(st, checkpoint, log)
        gaussians, _, _ = decode_scene(model, st, scene)
        return gaussians, None, f"{scene}: {gaussians.num} Gaussians from decoder {source}", model.config.background
    except LyraError as exc:
        if checkpoint is not None or "depth/depth" not in arrays or "input/rgb" not in arrays:
            raise
        points = rgbd_points(st.read_array(scene, "input/rgb"), st.read_array(scene, "depth/depth"),
                             st.read_array(scene, "input/K"))
        note = f"{scene}: input RGB-D point cloud ({len(points[0])} points; no decoder: {exc})"
        if log is not None:
            log(note)
        return None, points, note, None


class SequencePlayer:
    """A Gaussian sequence in the viewer: a "time step" slider and a "play" toggle that swap the shown Gaussians
    (``load(i)`` -> the Gaussians of step ``i``, loaded on first use and kept). ``labels[i]`` names step i."""

    def __init__(self, server, labels: list[str], load: Callable[[int], Gaussians], fps: float = 8.0,
                 splats: Callable[[Gaussians], dict | None] = viewer_splats) -> None:
        import threading

        self.server, self.labels, self.load, self.fps, self.splats = server, labels, load, float(fps), splats
        self.cache: dict[int, Gaussians] = {}
        self.current = -1
        self.slider = server.gui.add_slider("time step", min=0, max=max(len(labels) - 1, 1), step=1, initial_value=0,
                                            disabled=len(labels) < 2)
        self.label = server.gui.add_markdown(labels[0])
        self.play = server.gui.add_checkbox("play", initial_value=False)
        self.slider.on_update(lambda _: self.show(int(self.slider.value)))
        self.show(0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def gaussians(self, i: int) -> Gaussians:
        if i not in self.cache:
            self.cache[i] = self.load(i)
        return self.cache[i]

    def show(self, i: int) -> None:
        """Show step ``i`` (no-op when already shown)."""
        if i == self.current:
            return
        splats = self.splats(self.gaussians(i))
        if splats is not None:
            add_splats(self.server, "/gaussians", splats)  # same name: replaces the last step
        else:
            self.server.scene.remove_by_name("/gaussians")
        self.label.content = self.labels[i]
        self.current = i

    def refresh(self) -> None:
        """Show the current step again (after a display setting changed)."""
        i, self.current = self.current, -1
        self.show(max(i, 0))

    def _loop(self) -> None:
        while not self._stop.wait(1.0 / self.fps):
            if self.play.value and len(self.labels) > 1:
                nxt = (self.current + 1) % len(self.labels)
                self.show(nxt)
                self.slider.value = nxt

    def stop(self) -> None:
        self._stop.set()


def read_sequence(path: str | Path) -> tuple[list[dict], Path]:
    """The frames of a ``<stem>.sequence.json`` index (``lyra export-ply --times``), each file checked."""
    import json

    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        frames = list(doc["frames"])
        files = [path.parent / str(f["file"]) for f in frames]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LyraInputError(f"{path}: not a lyra sequence index (expected JSON with 'frames': [{{'file', 'time', "
                             f"'frame'}}, ...] as `lyra export-ply --times` writes): {exc}") from None
    missing = [str(f) for f in files if not f.is_file()]
    if not frames or missing:
        raise LyraInputError(f"{path}: " + (f"missing PLY files {missing[:3]}" if missing else "no frames"))
    return frames, path.parent


def dynamic_sequence(st: RunStore, scene: str, checkpoint: str | Path | None,
                     log: Callable[[str], None] | None = None) -> tuple[tuple[list[str], Callable], str, str]:
    """(labels, loader) of a stored dynamic scene's time steps (decoded on first view), a note and the background
    the decoder was trained over."""
    from lyra_pipeline.reconstruct import resolve_decoder
    from lyra_pipeline.training import ViewCache, dynamic_inputs, scene_gaussians_at

    model, source = resolve_decoder(st, checkpoint, log, dynamic=True)
    forward = dynamic_inputs(st, scene)
    views = ViewCache(st, size=len(forward) + 2)
    _, times = views.input_view(scene)
    labels = [f"frame {i} · time {float(t):.3f}" for i, t in enumerate(times)]
    kind = "time-conditioned" if model.config.time_embedding else "static (applied per frame)"
    return (labels, lambda i: scene_gaussians_at(model, views, scene, forward, i)), (
        f"{scene}: {len(labels)} time steps from {kind} decoder {source}"), model.config.background


def check_address(host: str, port: int) -> None:
    """``--host`` / ``--port`` checked before the server starts (viser's server thread dies on a port outside
    0-65535 and retries 1000 ports on an address it cannot bind, while the caller waits for it forever): a port
    1-65535, or 0 for any free port; a host this machine can listen on."""
    import socket

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise LyraInputError(f"--port {port}: expected a TCP port 1-65535, or 0 for any free port")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as exc:
        raise LyraInputError(f"--host {host!r}: cannot resolve it ({getattr(exc, 'strerror', None) or exc}); "
                             "expected an address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    with socket.socket(family, kind, proto) as sock:
        try:
            sock.bind((addr[0], 0, *addr[2:]))
        except OSError as exc:
            raise LyraInputError(f"--host {host!r}: cannot listen on it ({exc.strerror or exc}); expected an "
                                 "address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None


def start_viewer(
    *,
    store: str | None = None,
    scene: str | None = None,
    ply: str | Path | None = None,
    checkpoint: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    log: Callable[[str], None] | None = None,
):
    """Start a viser server showing a PLY, or a stored scene (decoder Gaussians when a decoder is available,
    else the input RGB-D point cloud) with its trajectories and input image. Returns the running server.

    The decoder: ``checkpoint``, else the store's newest finished training, else the shipped package decoder;
    ``log`` gets one line saying which (or that the point cloud is shown)."""
    viser = _viser()
    check_address(host, port)
    if ply is None and (store is None or scene is None):
        raise LyraInputError("lyra view: give a PLY path, a .sequence.json, or --store and a scene id")
    gaussians, trajectories, image, points, background = None, {}, None, None, None
    sequence: tuple[list[str], Callable[[int], Gaussians]] | None = None
    note = ""
    if ply is not None and str(ply).endswith(".sequence.json"):
        frames, folder = read_sequence(ply)
        labels = [f"frame {f['frame']} · time {float(f['time']):.3f} · {f['file']}" for f in frames]
        sequence = (labels, lambda i: Gaussians.from_ply(folder / frames[i]["file"]))
        note = f"{ply}: {len(frames)} time steps"
    elif ply is not None:
        gaussians = Gaussians.from_ply(ply)
        note = f"{ply}: {gaussians.num} Gaussians"
        recorded = export_camera(ply)
        if recorded is not None:  # opens at the input camera the export recorded
            trajectories = {"input": recorded}
    else:
        st = RunStore(store, create=False)
        if scene not in st.scene_ids():
            raise LyraInputError(f"{store}: no scene {scene!r}")
        arrays = st.list_arrays(scene)
        for path in arrays:
            parts = path.split("/")
            if parts[0] == "trajectories" and parts[2:] == ["cameras", "c2w"]:
                c2w = torch.from_numpy(st.read_array(scene, path)).float()
                k = torch.from_numpy(st.read_array(scene, f"trajectories/{parts[1]}/cameras/K")).float()
                rgb = st.list_arrays(scene).get("input/rgb")
                h, w = (rgb.shape[1], rgb.shape[2]) if rgb is not None else (int(2 * k[0, 1, 2]), int(2 * k[0, 0, 2]))
                trajectories[parts[1]] = Cameras(c2w, k, h, w)
        if "input/rgb" in arrays:
            image = np.moveaxis(st.read_array(scene, "input/rgb"), 0, -1)
        if is_dynamic_scene(st, scene):  # a dynamic scene: the decoder's Gaussians at every input frame
            sequence, note, background = dynamic_sequence(st, scene, checkpoint, log)
        else:
            gaussians, points, note, background = scene_view(st, scene, arrays, checkpoint, log)
    camera = input_camera(trajectories)
    server = viser.ViserServer(host=host, port=port, label="lyra", verbose=False)
    floor = None
    window = {"factor": 1.0}  # window_floor over the connected browsers (display_floor's factor, times `floor`)
    if camera is not None and (gaussians is not None or sequence is not None):
        floor = server.gui.add_slider(
            "splat floor", min=0.0, max=8.0, step=0.25, initial_value=1.0,
            hint="display only: Gaussians narrower than viser draws are widened to what it draws in this window "
                 "(1; a window smaller than the input frame gets wider ones); more: smoother, 0: as decoded")

    def prepare(g: Gaussians) -> dict | None:
        if camera is None or floor is None:
            return viewer_splats(g)
        factor = float(floor.value) * window["factor"]
        return viewer_splats(g, camera.c2w[0, :3, 3], float(camera.K[0, 0, 0]), factor)

    splats = None
    if sequence is not None:
        server.player = SequencePlayer(server, *sequence, splats=prepare)
        splats = prepare(server.player.gaussians(0))
    elif gaussians is not None:
        splats = prepare(gaussians)
        if splats is not None:
            add_splats(server, "/gaussians", splats)
        else:
            note += " (empty: nothing to show)"
    def resend() -> None:
        if sequence is not None:
            server.player.refresh()
        else:
            add_splats(server, "/gaussians", prepare(gaussians))

    if floor is not None:
        floor.on_update(lambda _: resend())
        import threading

        focal, lock = float(camera.K[0, 0, 0]), threading.Lock()

        def follow_windows(_=None) -> None:
            """The floor for the smallest window (device pixels, viser's current resolution included)."""
            with lock:  # camera updates arrive on viser's thread pool
                clients = list(server.get_clients().values())
                factor = max([window_floor(focal, c.camera.image_height, c.camera.fov) for c in clients],
                             default=1.0)
                if factor != window["factor"]:
                    window["factor"] = factor
                    resend()

        server.on_client_connect(lambda client: client.camera.on_update(follow_windows))
        server.on_client_disconnect(follow_windows)
    if points is not None and len(points[0]):
        server.scene.add_point_cloud("/points", points=points[0], colors=points[1], point_size=0.01)
    if trajectories:
        # off at the start: from the input camera, the input frustum's image would cover the view
        cameras = server.scene.add_frame("/cameras", show_axes=False, visible=False)
        add_trajectories(server, trajectories, image, parent="/cameras")
        toggle = server.gui.add_checkbox("camera paths", initial_value=False)
        toggle.on_update(lambda _: setattr(cameras, "visible", bool(toggle.value)))
    if image is not None and background is not None:
        colour = background_color(torch.from_numpy(np.moveaxis(image, -1, 0).copy()), background)
        if colour is not None:  # the decoder's background (None: white, viser's own)
            server.scene.set_background_image(np.tile(to_uint8_colour(colour), (8, 8, 1)), format="png")
    set_initial_camera(server, camera, splats)
    server.gui.add_markdown(f"**lyra** · {note}")
    return server


def export_camera(ply: str | Path) -> Cameras | None:
    """The input camera an export recorded beside ``ply`` (``<stem>.export.json``, ``result.camera``: c2w, K,
    height, width), or None (no sidecar, an older one, or one of another form)."""
    import json

    from lyra_pipeline.outputs import sidecar_path

    try:
        cam = json.loads(sidecar_path(ply).read_text(encoding="utf-8"))["result"]["camera"]
        c2w, K = torch.tensor(cam["c2w"], dtype=torch.float32), torch.tensor(cam["K"], dtype=torch.float32)
        if c2w.shape != (4, 4) or K.shape != (3, 3) or not (torch.isfinite(c2w).all() and torch.isfinite(K).all()):
            return None
        return Cameras(c2w[None], K[None], int(cam["height"]), int(cam["width"]))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None


def to_uint8_colour(colour: torch.Tensor) -> np.ndarray:
    return np.round(colour.clamp(0, 1).numpy() * 255).astype(np.uint8)


def input_camera(trajectories: dict[str, Cameras]) -> Cameras | None:
    """The camera every trajectory starts from (frame 0 of the first, by name), or None without trajectories."""
    if not trajectories:
        return None
    cams = trajectories[sorted(trajectories)[0]]
    return cams[torch.tensor([0])]


def initial_view(camera: Cameras | None, splats: dict | None) -> dict:
    """Where the viewer opens: at ``camera`` (the input camera; None: lyra's convention, the world origin
    looking down +z, y down), looking along its optical axis at the median depth of the Gaussians in front of it
    (the orbit centre), with the scene's up its -y axis and, with a camera, its vertical field of view (radians)."""
    c2w = camera.c2w[0].double().numpy() if camera is not None else np.eye(4)
    position, forward, up = c2w[:3, 3], c2w[:3, 2], -c2w[:3, 1]
    depth = 1.0
    if splats is not None:
        z = (splats["centers"].astype(np.float64) - position) @ forward
        z = z[z > 0]
        depth = float(np.median(z)) if z.size else 1.0
    view = {"position": position, "look_at": position + depth * forward, "up": up}
    if camera is not None:
        view["fov"] = float(2 * np.arctan(camera.height / (2 * float(camera.K[0, 1, 1]))))
    return view


def set_initial_camera(server, camera: Cameras | None, splats: dict | None) -> dict:
    """``server``'s initial camera (new clients and "Reset View") at :func:`initial_view`; returns that view."""
    view = initial_view(camera, splats)
    server.scene.set_up_direction(tuple(float(v) for v in view["up"]))
    server.initial_camera.position = tuple(float(v) for v in view["position"])
    server.initial_camera.look_at = tuple(float(v) for v in view["look_at"])
    if "fov" in view:
        server.initial_camera.fov = view["fov"]
    return view
