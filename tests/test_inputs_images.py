"""User images in every PIL mode, EXIF orientation, alpha, and the image folder's prompt warnings."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from lyra_pipeline.inputs import ALPHA_BACKGROUND, load_image, scan_image_folder


def _load(path, h=16, w=16):
    return (load_image(path, h, w) * 255).round().numpy()  # (3,H,W) 0..255


def test_sixteen_bit_greyscale_keeps_its_brightness(tmp_path):
    """A 16-bit PNG at half scale reads as ~128, not white (PIL's convert('RGB') clipped it to 255)."""
    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode in ("I;16", "I")
    assert np.allclose(_load(tmp_path / "g16.png"), 128, atol=1)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGB"])
def test_eight_bit_modes_read_as_their_colour(tmp_path, mode):
    rgb = Image.new("RGB", (16, 16), (200, 100, 50))
    im = rgb.convert("P", palette=Image.Palette.ADAPTIVE) if mode == "P" else rgb.convert(mode)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    im.save(tmp_path / f"x{suffix}", quality=100) if suffix == ".jpg" else im.save(tmp_path / f"x{suffix}")
    got = _load(tmp_path / f"x{suffix}")[:, 8, 8]
    want = np.array([rgb.convert("L").getpixel((0, 0))] * 3) if mode == "L" else np.array([200, 100, 50])
    assert np.abs(got - want).max() <= 6, (mode, got)


def test_alpha_is_composited_with_a_warning_and_opaque_alpha_is_silent(tmp_path, caplog):
    px = np.zeros((16, 16, 4), dtype=np.uint8)
    px[..., 0], px[..., 3] = 255, 255
    px[:8, :, 3] = 0  # top half transparent
    Image.fromarray(px, "RGBA").save(tmp_path / "a.png")
    with caplog.at_level(logging.WARNING):
        out = _load(tmp_path / "a.png")
    assert np.allclose(out[:, 2, 8], ALPHA_BACKGROUND) and np.allclose(out[:, 13, 8], [255, 0, 0])
    assert "a.png: 50.0% of the pixels are not opaque" in caplog.text
    caplog.clear()
    px[..., 3] = 255
    Image.fromarray(px, "RGBA").save(tmp_path / "b.png")
    with caplog.at_level(logging.WARNING):
        _load(tmp_path / "b.png")
    assert "not opaque" not in caplog.text
    Image.fromarray(np.stack([np.full((16, 16), 90, np.uint8), np.full((16, 16), 255, np.uint8)], -1), "LA").save(
        tmp_path / "la.png")
    assert np.allclose(_load(tmp_path / "la.png"), 90)


def test_exif_orientation_is_applied(tmp_path):
    """A landscape JPEG tagged 'rotate 90 CW' (orientation 6) is a portrait picture: top row red after transpose."""
    px = np.zeros((16, 32, 3), dtype=np.uint8)
    px[:, :16] = (255, 0, 0)  # left half red: after a 90 degree clockwise turn it is the top half
    im = Image.fromarray(px)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = _load(tmp_path / "r.jpg", 32, 16)  # portrait video size: no crop
    assert out[0, 2, 8] > 200 and out[1, 2, 8] < 60  # top red
    assert out[0, 29, 8] < 60  # bottom not red


def test_missing_prompt_warns_once_per_scan_and_not_when_asked_not_to(tmp_path, caplog):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    with caplog.at_level(logging.WARNING):
        scan_image_folder(tmp_path, 0, warn=False)
        assert "no prompt file" not in caplog.text
        scan_image_folder(tmp_path, 0)
        scan_image_folder(tmp_path, 0)  # a run scans its folder more than once: still one warning
    assert caplog.text.count("no prompt file a.txt") == 1


def test_images_flag_uses_every_image_unless_num_scenes_is_given(tmp_path):
    """``--images DIR`` used to take the preset's num_scenes (2 for smoke) of the folder, chosen by seed."""
    from lyra_pipeline.cli import _overrides

    for name in ("a", "b", "c"):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{name}.png")
    (tmp_path / "notes.md").write_text("not an image")
    _, over = _overrides(None, None, tmp_path, None, None)
    assert over["scenes"]["num_scenes"] == 3
    _, over = _overrides(None, 1, tmp_path, None, None)
    assert over["scenes"]["num_scenes"] == 1
