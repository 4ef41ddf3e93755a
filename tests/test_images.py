"""Image files of every Pillow mode become the right 8-bit RGB, the same through every reader
(`ssd_jax.data.images`, the VOC readers, `Detector`'s `load_image`)."""
import io

import numpy as np
import pytest
from PIL import Image

from ssd_jax.data import images, voc
from ssd_jax.detector import load_image

RAMP = np.linspace(0, 1, 64 * 48).reshape(48, 64)  # 0 .. 1, every pixel different


def _saved(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _grey(rgb):
    assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    return rgb[..., 0].astype(int)


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I", "TIFF")])
def test_16_bit_grey_is_scaled_to_8_bits_not_clipped(mode, fmt):
    sixteen = np.round(RAMP * 65535).astype(np.uint16 if mode == "I;16" else np.int32)
    image = Image.fromarray(sixteen)
    assert image.mode == mode
    data = _saved(image, fmt)
    grey = _grey(images.decode_image(data))
    np.testing.assert_allclose(grey, RAMP * 255, atol=0.51)  # not 99.6 % white
    assert grey.min() == 0 and grey.max() == 255


def test_32_bit_float_grey_is_scaled_from_0_1():
    grey = _grey(images.to_rgb(Image.fromarray(RAMP.astype(np.float32), "F")))
    np.testing.assert_allclose(grey, RAMP * 255, atol=0.51)


@pytest.mark.parametrize("mode, fmt, colour, expected", [
    ("P", "PNG", 7, (10, 20, 30)), ("LA", "PNG", (90, 128), (90, 90, 90)),
    ("PA", None, (7, 128), (10, 20, 30)), ("RGBA", "PNG", (1, 2, 3, 0), (1, 2, 3)),
    ("1", "PNG", 1, (255, 255, 255)), ("L", "JPEG", 77, (77, 77, 77)),
    ("CMYK", "JPEG", (0, 255, 255, 0), (255, 0, 0)), ("CMYK", "TIFF", (0, 255, 0, 0), (255, 0, 255)),
    ("YCbCr", "JPEG", (76, 85, 255), (254, 0, 0))])
def test_every_8_bit_mode_reads_as_its_rgb_colour(mode, fmt, colour, expected):
    """From a file of that mode where Pillow writes one (fmt), else from the PIL image."""
    image = Image.new(mode, (64, 48), colour)
    if mode in ("P", "PA"):
        image.putpalette([10, 20, 30] * 256)
    rgb = images.to_rgb(image) if fmt is None else images.decode_image(_saved(image, fmt))
    assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3)
    np.testing.assert_allclose(rgb.reshape(-1, 3).mean(0), expected, atol=2)


def test_every_reader_decodes_a_file_the_same(tmp_path):
    path = tmp_path / "sixteen.png"
    Image.fromarray(np.round(RAMP * 65535).astype(np.uint16)).save(path)
    decoded = images.read_image(path)
    for same in (voc.read_image(path), load_image(path), load_image(path.read_bytes()),
                 load_image(Image.open(path))):
        np.testing.assert_array_equal(same, decoded)


def test_detector_inputs_that_are_no_image_are_value_errors_naming_them(tmp_path):
    with pytest.raises(ValueError, match="image must be a file path, image file bytes, .*NoneType"):
        load_image(None)
    with pytest.raises(ValueError, match="images\\[2\\]: the 9 bytes given are not an image"):
        load_image(b"not a png", "images[2]")
