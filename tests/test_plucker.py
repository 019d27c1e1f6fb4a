"""Pixel rays, Plücker embeddings and their encoding onto the latent grid."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lyra_ops.cameras import Cameras, default_intrinsics
from lyra_ops.errors import LyraInputError
from lyra_ops.latents import PixelPatchifyEncoder
from lyra_ops.plucker import (
    encode_plucker,
    pixel_rays,
    plucker_embedding,
    plucker_latent_channels,
)


def rotation(q: torch.Tensor) -> torch.Tensor:
    w, x, y, z = (q / q.norm()).tolist()
    return torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ],
        dtype=torch.float64,
    )


def random_cameras(n: int, h: int, w: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Cameras:
    gen = torch.Generator().manual_seed(seed)
    c2w = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    for i in range(n):
        c2w[i, :3, :3] = rotation(torch.randn(4, generator=gen, dtype=torch.float64))
        c2w[i, :3, 3] = torch.randn(3, generator=gen, dtype=torch.float64) * 2
    k = default_intrinsics(h, w).double().repeat(n, 1, 1)
    k[:, 0, 2] += torch.randn(n, generator=gen, dtype=torch.float64)  # off-centre principal points
    k[:, 1, 1] *= 1.1
    return Cameras(c2w.to(dtype), k.to(dtype), h, w)


def test_shapes_dtype_unit_directions_and_orthogonal_moment() -> None:
    cams = random_cameras(3, 16, 24)
    origins, dirs = pixel_rays(cams)
    assert origins.shape == dirs.shape == (3, 16, 24, 3)
    assert dirs.dtype == torch.float32
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(3, 16, 24), atol=1e-6, rtol=0)
    pl = plucker_embedding(cams)
    assert pl.shape == (3, 6, 16, 24) and pl.dtype == torch.float32
    moment, direction = pl[:, :3], pl[:, 3:]
    assert (moment * direction).sum(dim=1).abs().max() < 1e-5
    torch.testing.assert_close(direction, dirs.permute(0, 3, 1, 2))


def test_centre_pixel_ray_points_along_camera_z() -> None:
    cams = random_cameras(2, 16, 24)
    k = default_intrinsics(16, 24).double().repeat(2, 1, 1)  # centred principal point (12, 8)
    cams = Cameras(cams.c2w, k, 16, 24)
    # pixel centres sit at (j + 0.5, i + 0.5): the principal point (12, 8) is the corner shared by 4 pixels,
    # whose rays are symmetric about the optical axis
    _, dirs = pixel_rays(cams, dtype=torch.float64)
    mean = dirs[:, 7:9, 11:13].reshape(2, 4, 3).mean(dim=1)
    mean = mean / mean.norm(dim=-1, keepdim=True)
    z_world = cams.c2w[:, :3, 2]
    torch.testing.assert_close(mean, z_world, atol=1e-12, rtol=0)
    # an odd-sized image has a pixel whose centre is the principal point
    odd = Cameras(cams.c2w, default_intrinsics(15, 21).double().repeat(2, 1, 1), 15, 21)
    _, dirs = pixel_rays(odd, dtype=torch.float64)
    torch.testing.assert_close(dirs[:, 7, 10], z_world, atol=1e-12, rtol=0)


def test_downsampled_rays_pass_through_block_centres() -> None:
    cams = random_cameras(2, 32, 48, seed=1)
    origins8, dirs8 = pixel_rays(cams, downsample=8, dtype=torch.float64)
    assert dirs8.shape == (2, 4, 6, 3)
    # independent unprojection of full-res continuous points (x, y) = (8j + 4, 8i + 4)
    ii, jj = torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij")
    pix = torch.stack([8 * jj + 4, 8 * ii + 4, torch.ones_like(ii)], dim=-1).double()
    cam = torch.einsum("nij,hwj->nhwi", torch.linalg.inv(cams.K), pix)
    world = torch.einsum("nij,nhwj->nhwi", cams.c2w[:, :3, :3], cam)
    torch.testing.assert_close(dirs8, world / world.norm(dim=-1, keepdim=True), atol=1e-12, rtol=0)
    torch.testing.assert_close(origins8, cams.centers[:, None, None].expand(2, 4, 6, 3))
    # same as full-res rays of cameras whose four intrinsics are divided by 8 (spec 4.2)
    k8 = cams.K.clone()
    k8[:, :2] /= 8
    _, dirs_k8 = pixel_rays(Cameras(cams.c2w, k8, 4, 6), dtype=torch.float64)
    torch.testing.assert_close(dirs8, dirs_k8, atol=1e-12, rtol=0)


def test_downsample_of_resized_cameras_equals_original_rays() -> None:
    cams = random_cameras(2, 8, 12, seed=2)
    _, dirs = pixel_rays(cams, dtype=torch.float64)
    _, dirs2 = pixel_rays(cams.resized(16, 24), downsample=2, dtype=torch.float64)
    torch.testing.assert_close(dirs2, dirs, atol=1e-12, rtol=0)


def test_translated_camera_moment_is_o_cross_d() -> None:
    k = default_intrinsics(8, 8).repeat(1, 1, 1)
    base = Cameras(torch.eye(4)[None], k, 8, 8)
    assert plucker_embedding(base)[:, :3].abs().max() == 0  # origin at 0: zero moment
    c2w = torch.eye(4)[None].clone()
    c2w[0, :3, 3] = torch.tensor([1.0, -2.0, 3.0])
    moved = Cameras(c2w, k, 8, 8)
    pl = plucker_embedding(moved)
    dirs = pl[:, 3:].permute(0, 2, 3, 1)
    expected = torch.linalg.cross(torch.tensor([1.0, -2.0, 3.0]).expand_as(dirs), dirs, dim=-1)
    torch.testing.assert_close(pl[:, :3].permute(0, 2, 3, 1), expected)
    # translation leaves directions unchanged
    torch.testing.assert_close(pl[:, 3:], plucker_embedding(base)[:, 3:])


@settings(max_examples=20, deadline=None)
@given(
    q=st.tuples(*[st.floats(-1, 1) for _ in range(4)]).filter(lambda v: sum(x * x for x in v) > 0.1),
    t=st.tuples(*[st.floats(-3, 3) for _ in range(3)]),
    shift=st.floats(-5, 5),
)
def test_rigid_world_transform_and_origin_shift_invariance(q: tuple, t: tuple, shift: float) -> None:
    cams = random_cameras(2, 8, 16, seed=5)
    rot = rotation(torch.tensor(q, dtype=torch.float64))
    trans = torch.tensor(t, dtype=torch.float64)
    world = torch.eye(4, dtype=torch.float64)
    world[:3, :3], world[:3, 3] = rot, trans
    moved = Cameras(world @ cams.c2w, cams.K, 8, 16)
    pl = plucker_embedding(cams, dtype=torch.float64)
    pl_moved = plucker_embedding(moved, dtype=torch.float64)
    d, m = pl[:, 3:], pl[:, :3]
    d_rot = torch.einsum("ij,njhw->nihw", rot, d)
    # lines transform as d -> R d, m -> R m + t x R d
    torch.testing.assert_close(pl_moved[:, 3:], d_rot, atol=1e-10, rtol=0)
    expected_m = torch.einsum("ij,njhw->nihw", rot, m) + torch.linalg.cross(
        trans[None, :, None, None].expand_as(d_rot), d_rot, dim=1
    )
    torch.testing.assert_close(pl_moved[:, :3], expected_m, atol=1e-9, rtol=0)
    # the moment does not depend on which point of the ray is the origin
    origins, dirs = pixel_rays(cams, dtype=torch.float64)
    shifted = torch.linalg.cross(origins + shift * dirs, dirs, dim=-1).permute(0, 3, 1, 2)
    torch.testing.assert_close(shifted, m, atol=1e-10, rtol=0)


def test_float32_even_for_bf16_like_inputs_and_errors() -> None:
    cams = random_cameras(1, 16, 16, dtype=torch.float32)
    assert plucker_embedding(cams).dtype == torch.float32
    with pytest.raises(LyraInputError, match="downsample"):
        pixel_rays(cams, downsample=3)
    with pytest.raises(LyraInputError, match="float32 or torch.float64"):
        pixel_rays(cams, dtype=torch.bfloat16)


def test_encode_plucker_pooled_fallback() -> None:
    enc = PixelPatchifyEncoder()
    cams = random_cameras(17, 16, 24, seed=7, dtype=torch.float32)
    pl = plucker_embedding(cams)
    lat = encode_plucker(pl, enc)
    assert lat.shape == (48, 3, 2, 3) == (plucker_latent_channels(enc), 3, 2, 3)
    # channel = slot * 6 + plucker channel; latent frame 0 = frame 0 in every slot, frame k>=1 = 8(k-1)+1+slot
    for k, slot, c, y, x in [(0, 3, 4, 1, 2), (1, 0, 0, 0, 0), (2, 7, 5, 1, 1), (2, 2, 1, 0, 2)]:
        frame = 0 if k == 0 else 8 * (k - 1) + 1 + slot
        block = pl[frame, c, 8 * y : 8 * y + 8, 8 * x : 8 * x + 8]
        torch.testing.assert_close(lat[slot * 6 + c, k, y, x], block.mean())
    with pytest.raises(LyraInputError, match="8k\\+1"):
        encode_plucker(pl[:16], enc)
    with pytest.raises(LyraInputError, match=r"\(T, 6, H, W\)"):
        encode_plucker(pl[:, :3], enc)


class _FakeVae:
    """A stand-in VAE (C=2): mean over the 8x8 block of the first two channels, causal like the real ones."""

    name = "fake"
    latent_channels = 2
    temporal_factor = 8
    spatial_factor = 8

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        self.calls.append(frames)
        pooled = torch.nn.functional.avg_pool2d(frames[::8, :2], 8)
        return pooled.permute(1, 0, 2, 3)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def test_encode_plucker_vae_path_encodes_halves_raw_and_concatenates() -> None:
    vae = _FakeVae()
    pl = plucker_embedding(random_cameras(9, 16, 16, seed=8, dtype=torch.float32)) * 5  # raw, not in [-1, 1]
    out = encode_plucker(pl, vae)
    assert plucker_latent_channels(vae) == 4 and out.shape == (4, 2, 2, 2)
    assert torch.equal(vae.calls[0], pl[:, :3]) and torch.equal(vae.calls[1], pl[:, 3:])
    torch.testing.assert_close(out[:2], vae.encode(pl[:, :3]))
    torch.testing.assert_close(out[2:], vae.encode(pl[:, 3:]))
