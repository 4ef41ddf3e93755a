"""Image files to pixels: one decoder for every reader (the VOC sources, `Detector`,
`ssd-jax detect`), so an image comes out the same whichever path reads it.

Every mode Pillow opens becomes uint8 [H, W, 3] RGB by what its values mean:
- 8-bit modes ("L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV", "1", ...) by Pillow's own
  conversion; alpha ("RGBA", "LA", "PA") is dropped;
- 16-bit grey ("I;16", "I;16B", ..., and "I", which Pillow gives 16-bit PNGs and TIFFs) scaled
  from 0..65535 to 0..255 (Pillow's own conversion clips to 255 instead: a 16-bit image would
  come out almost white);
- 32-bit float grey ("F") scaled from 0..1.
"""
import io
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
SIMPLEJPEG_COLOURSPACES = ("YCbCr", "Gray")  # others (CMYK, YCCK) go through Pillow


def to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image of any mode as uint8 [H, W, 3] RGB (see the module docstring)."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image, np.float64)
        full_scale = 1.0 if image.mode == "F" else 65535.0
        grey = np.round(np.clip(values / full_scale, 0.0, 1.0) * 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


def decode_image(data: bytes) -> np.ndarray:
    """Image file bytes -> uint8 [H, W, 3] RGB (grey repeated in the three channels).

    JPEGs are decoded by libjpeg-turbo through simplejpeg, into the array directly: the same
    pixels as Pillow (both run libjpeg-turbo's default IDCT and upsampling) in two thirds of the
    time, which matters in the input pipeline. Pillow reads the rest (PNG, CMYK JPEGs, ...).
    Raises ValueError or OSError if the bytes are not a whole image.
    """
    if _simplejpeg_reads(data):
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    with Image.open(io.BytesIO(data)) as image:
        return to_rgb(image)


def _simplejpeg_reads(data: bytes) -> bool:
    if not simplejpeg.is_jpeg(data):
        return False
    try:
        return simplejpeg.decode_jpeg_header(data)[2] in SIMPLEJPEG_COLOURSPACES
    except ValueError:  # a damaged header: Pillow says what is wrong
        return False


def read_image(path) -> np.ndarray:
    """The image file at `path` as uint8 [H, W, 3] RGB (`decode_image`); OSError naming the
    file if it cannot be read or decoded."""
    try:
        return decode_image(Path(path).read_bytes())
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        # Pillow's and simplejpeg's messages name no file.
        raise OSError(f"cannot read image file {path}: {_reason(error)}") from error


def _reason(error: Exception) -> str:
    """Why a file could not be read, without repeating its path."""
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image format Pillow knows"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror  # e.g. "No such file or directory"
    return str(error)
