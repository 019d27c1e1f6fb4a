"""Colours of a set of Gaussians solved so that their render reproduces an image (damped linear least squares).

With geometry and opacities fixed, a rendered image is affine in the Gaussians' colours: each pixel is
``sum_i w_i(p) c_i + T(p) background`` with weights and transmittance that do not depend on the colours. So the
colours that make one camera's render match an image, kept near the colours they start from, solve a linear
least-squares problem with Tikhonov damping::

    min_c  || R(c) - image ||^2  +  ridge * || c - c0 ||^2     (sums over pixels x channels, Gaussians x channels)

solved here by CGLS (conjugate gradients on the damped normal equations), each iteration one render of the
colour update (``A p``) and one vector-Jacobian product (``A^T r``), both through the differentiable rasterizer.
The decoder uses it at inference on its input head against the input image (``input_fit``): the learned
Gaussians blur what the input shows exactly; the solved colours undo that blur where the geometry allows, and the
damping keeps what other cameras see from ringing (``ridge`` 0 fits the input view alone). Colours end clamped
to [0, 1] (the PLY and every viewer expect them there).
"""

from __future__ import annotations

import dataclasses

import torch

from lyra_ops.errors import LyraInputError
from lyra_ops.gaussians import Gaussians
from lyra_ops.rasterize import rasterize

CONVERGED = 1e-7  # CGLS stops once the normal equations' residual norm fell by this factor


def fit_colors(
    gaussians: Gaussians,
    which: torch.Tensor,
    viewmat: torch.Tensor,
    K: torch.Tensor,
    image: torch.Tensor,
    *,
    background: torch.Tensor | None = None,
    ridge: float = 1.0,
    iterations: int = 20,
    backend: str = "torch",
    near: float = 0.01,
    far: float = 1e10,
) -> Gaussians:
    """``gaussians`` with the colours of ``which`` ((M,) bool) solved so their render at one camera (w2c
    ``viewmat`` (4,4), pixel ``K`` (3,3)) matches ``image`` (3,H,W) in [0,1] over ``background`` (3,) (None: black),
    damped towards their current colours by ``ridge`` >= 0 (see the module docstring); at most ``iterations``
    CGLS steps (fewer once converged, :data:`CONVERGED`).
    The other Gaussians' colours and every other field are returned unchanged; the solved colours are clamped to
    [0, 1]; the result carries no gradient. No randomness: on the CPU the same inputs give the same bytes (CUDA's
    atomic accumulation in the rasterizer's backward may differ in the last bits)."""
    fn = "fit_colors"
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        found = (f"{tuple(image.shape)} {image.dtype}" if isinstance(image, torch.Tensor)
                 else type(image).__name__)
        raise LyraInputError(f"{fn}: image must be a float tensor (3, H, W) in [0, 1], got {found}")
    if not isinstance(which, torch.Tensor) or which.dtype != torch.bool or tuple(which.shape) != (gaussians.num,):
        raise LyraInputError(f"{fn}: which must be a bool tensor ({gaussians.num},) selecting the Gaussians to fit")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise LyraInputError(f"{fn}: ridge must be a number >= 0, got {ridge!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise LyraInputError(f"{fn}: iterations must be an int >= 0, got {iterations!r}")
    n = int(which.sum())
    if n == 0 or iterations == 0:
        return gaussians
    _, height, width = image.shape
    dev, dtype = gaussians.means.device, gaussians.means.dtype
    vm, ks = viewmat.to(dev, dtype)[None], K.to(dev, dtype)[None]
    target = image.to(dev, dtype)[None]
    idx = which.to(dev).nonzero().squeeze(1)
    zero_bg = torch.zeros(3, device=dev, dtype=dtype)
    geometry = dataclasses.replace(gaussians, colors=torch.zeros_like(gaussians.colors))

    def render_update(p: torch.Tensor) -> torch.Tensor:  # A p: the fitted Gaussians coloured p, nothing else
        colors = torch.zeros_like(gaussians.colors).index_copy(0, idx, p)
        return rasterize(dataclasses.replace(geometry, colors=colors), vm, ks, width, height, background=zero_bg,
                         backend=backend, near=near, far=far).rgb

    def adjoint(r: torch.Tensor) -> torch.Tensor:  # A^T r
        p = torch.zeros(n, 3, device=dev, dtype=dtype, requires_grad=True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad((render_update(p) * r).sum(), p)
        return grad

    with torch.no_grad():
        start = gaussians.colors[idx]
        r = target - rasterize(gaussians, vm, ks, width, height, background=background, backend=backend, near=near,
                               far=far).rgb
    x = torch.zeros_like(start)
    s = adjoint(r)
    p = s.clone()
    gamma = float((s * s).sum())
    stop = gamma * CONVERGED**2
    for _ in range(iterations):
        if gamma <= stop:  # converged: further steps would only divide rounding noise
            break
        with torch.no_grad():
            q = render_update(p)
            alpha = gamma / (float((q * q).sum()) + ridge * float((p * p).sum()))
            x = x + alpha * p
            r = r - alpha * q
        s = adjoint(r) - ridge * x
        gamma_next = float((s * s).sum())
        p = s + (gamma_next / gamma) * p
        gamma = gamma_next
    colors = gaussians.colors.detach().clone()
    colors[idx] = (start + x).clamp(0.0, 1.0)
    return dataclasses.replace(gaussians, colors=colors)
