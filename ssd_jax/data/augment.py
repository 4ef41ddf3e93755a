"""Fast twin of `reference.augment.ssd_augment`: the same output, bit for bit, for less work.

The reference distorts the colours of the whole image, pastes it on a canvas of up to 16 times its
area, crops a patch of that, mirrors it and resizes it. But the bilinear resize reads only two
rows and two columns of the patch per output row and column. So here the geometry is settled
first, and only the pixels the resize reads are fetched from the image, distorted and
interpolated; the canvas is never built, and output pixels that read only its fill are set to the
fill colour without interpolating. The two agree exactly because
  * every photometric step maps each pixel on its own (`reference.augment.photometric_distort`),
    so distorting some pixels of the image gives those pixels of the distorted image; here
    they are distorted by the reference's own `apply_photometric`, on contiguous planes in
    strips, or through a table of the 256 values when every step maps a value on its own;
  * the canvas fill is the undistorted mean colour in both: the reference distorts before it
    zooms out;
  * the interpolation (`ssd_jax.data.resize.interpolate`, the twin of
    `reference.augment.resize`) reads the same values with the same weights, from a compact
    array instead of the mirrored patch, and between two fill pixels it gives the fill exactly
    (m + (m - m) * w == m);
  * each step draws from its own generator (`reference.augment.split_rng`), and the geometric
    choices depend only on the image size and the boxes, so making them first changes nothing.
tests/test_augment.py checks the equality.
"""
import functools
from typing import NamedTuple

import numpy as np

from reference import augment as reference_augment
from reference.augment import (MEAN_RGB, Photometric, adjust_brightness, adjust_contrast,
                               apply_photometric, check_example, crop_boxes, expand_boxes,
                               flip_boxes, sample_crop, sample_expansion, sample_flip,
                               sample_photometric, split_rng)
from ssd_jax.data.resize import Taps, bilinear_taps, interpolate

STRIP_PIXELS = 16384  # pixels per strip of `photometric_distort`


def ssd_augment(example: dict, rng: np.random.Generator, *, image_size: int,
                mean=MEAN_RGB) -> dict:
    """Same contract and same output as `reference.augment.ssd_augment`."""
    image, boxes, labels, difficult = check_example(example)
    photometric_rng, expand_rng, crop_rng, flip_rng = split_rng(rng, 4)
    height, width = image.shape[:2]
    expansion = sample_expansion(height, width, expand_rng)
    canvas_size = expansion.canvas_height, expansion.canvas_width
    boxes = expand_boxes(boxes, expansion, height, width)
    patch = sample_crop(boxes, *canvas_size, crop_rng)
    boxes, kept = crop_boxes(boxes, patch, *canvas_size)
    flipped = sample_flip(flip_rng)
    left, top, right, bottom = patch
    # Column i of the mirrored patch is canvas column right - 1 - i.
    row_axis = _Axis(top - expansion.top, 1, height)
    column_axis = (_Axis(right - 1 - expansion.left, -1, width) if flipped
                   else _Axis(left - expansion.left, 1, width))
    # Output pixels whose taps both read the mean fill around the image are that mean exactly
    # (m + (m - m) * w == m): only the run of rows and columns that read the image is computed.
    row_run, row_taps = _taps_reading_image(bilinear_taps(bottom - top, image_size), row_axis)
    column_run, column_taps = _taps_reading_image(bilinear_taps(right - left, image_size),
                                                  column_axis)
    resized = filled_canvas(image_size, image_size, mean)
    if row_taps.low.size and column_taps.low.size:
        rows, row_taps = _read_pixels(row_taps)
        columns, column_taps = _read_pixels(column_taps)
        pixels = _distorted_canvas_pixels(image, row_axis.image_index(rows),
                                          column_axis.image_index(columns), photometric_rng,
                                          mean)
        resized[row_run, column_run] = interpolate(pixels, row_taps, column_taps)
    return {**example, "image": resized,
            "boxes": flip_boxes(boxes) if flipped else boxes,
            "labels": labels[kept], "difficult": difficult[kept]}


def ssd_train_transform(image_size: int, mean=MEAN_RGB):
    """`reference.augment.ssd_train_transform` with the fast `ssd_augment`: a picklable
    `transform(example, rng)` for `ssd_jax.data.pipeline.make_train_loader`."""
    checked = reference_augment.ssd_train_transform(image_size, mean).keywords
    return functools.partial(ssd_augment, **checked)


def photometric_distort(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`reference.augment.photometric_distort`, the same pixels: uint8 [H, W, 3] -> uint8
    [H, W, 3].

    In strips of rows, as contiguous float32 planes [3, h, W] (NumPy runs elementwise operations
    on contiguous planes many times faster than on the interleaved layout), whose temporaries
    stay in cache and are recycled by malloc: whole-image temporaries cost more in page faults
    than in arithmetic.
    """
    params = sample_photometric(rng)
    if params.saturation is None and params.hue is None:
        return _distort_by_table(image, params)
    distorted = np.empty(image.shape, np.uint8)
    rows = max(1, STRIP_PIXELS // max(image.shape[1], 1))
    for top in range(0, image.shape[0], rows):
        strip = image[top:top + rows]
        pixels = np.array(np.moveaxis(strip, -1, 0), np.float32, order="C")  # planes [3, h, W]
        distorted[top:top + rows] = np.rint(_apply_photometric(pixels, params)).transpose(1, 2, 0)
    return distorted


def _apply_photometric(pixels: np.ndarray, params: Photometric) -> np.ndarray:
    """`reference.augment.apply_photometric` with its HSV round trip in `_saturation_and_hue`."""
    if params.brightness is not None:
        pixels = adjust_brightness(pixels, params.brightness)
    if params.contrast_first and params.contrast is not None:
        pixels = adjust_contrast(pixels, params.contrast)
    if params.saturation is not None or params.hue is not None:
        pixels = _saturation_and_hue(pixels, params.saturation or 1.0, params.hue)
    if not params.contrast_first and params.contrast is not None:
        pixels = adjust_contrast(pixels, params.contrast)
    if params.channels is not None:
        pixels = pixels[list(params.channels)]
    return pixels


def _saturation_and_hue(pixels, saturation, hue):
    """`reference.augment.adjust_saturation_and_hue` (hue None: 0), the same numbers for fewer
    passes over the planes and fewer temporaries: masks times values instead of np.where,
    in-place updates. Without a hue change the hue needs no wrapping: it is in [0, 360]
    already, and 360 and 0 give the same colour."""
    old_hue, new_saturation, value = _rgb_to_hsv(pixels)
    new_hue = old_hue if hue is None else _wrap_hue(old_hue + hue)
    new_saturation *= saturation
    np.minimum(new_saturation, 1, out=new_saturation)
    rgb = _hsv_to_rgb(new_hue, new_saturation, value)
    return np.clip(rgb, 0, 255, out=rgb)


def _rgb_to_hsv(rgb):
    """`reference.augment.rgb_to_hsv`: a mask times a value and + 0 give the numbers np.where
    picks (a zero's sign aside, which never reaches a colour)."""
    red, green, blue = rgb
    value = np.maximum(np.maximum(red, green), blue)
    chroma = value - np.minimum(np.minimum(red, green), blue)
    red_max = value == red
    green_max = (value == green) & ~red_max
    blue_max = ~(red_max | green_max)
    sixths = red_max * (green - blue)
    sixths += green_max * (2 * chroma + blue - red)
    sixths += blue_max * (4 * chroma + red - green)
    sixths /= chroma + (chroma == 0)
    sixths += sixths.dtype.type(6) * (sixths < 0)
    sixths *= 60
    return sixths, chroma / (value + (value == 0)), value


def _wrap_hue(hue):
    """`reference.augment.wrap_hue`, in place."""
    turn = hue.dtype.type(360)  # a NumPy scalar: a Python int times a bool array is int64
    hue += turn * (hue < 0)
    hue -= turn * (hue >= 360)
    return hue


def _hsv_to_rgb(hue, saturation, value):
    """`reference.augment.hsv_to_rgb`, each channel computed in place into the result."""
    chroma = value * saturation
    sixths = hue / 60
    rgb = np.empty((3,) + hue.shape, hue.dtype)
    for channel, n in enumerate((5, 3, 1)):
        k = sixths + n
        k -= k.dtype.type(6) * (k >= 6)
        np.minimum(k, 4 - k, out=k)
        np.clip(k, 0, 1, out=k)
        k *= chroma
        np.subtract(value, k, out=rgb[channel])
    return rgb


def _distort_by_table(image, params):
    """Without saturation and hue, every step maps a channel value on its own, the same way for
    all channels: the 256 possible results, computed once, give the same numbers as computing
    every pixel, several times faster."""
    values = np.arange(256, dtype=np.float32)
    table = np.rint(apply_photometric(values, params._replace(channels=None))).astype(np.uint8)
    distorted = np.take(table, image)
    return distorted if params.channels is None else distorted[..., list(params.channels)]


def filled_canvas(height: int, width: int, mean) -> np.ndarray:
    """`reference.augment.filled_canvas`: uint8 [height, width, 3] of the RGB `mean` rounded."""
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:1] = np.clip(np.rint(mean), 0, 255)
    # Copying the first row down is ~100x faster in NumPy than broadcasting 3 values everywhere.
    canvas[1:] = canvas[:1]
    return canvas


class _Axis(NamedTuple):
    """Along one axis, patch pixel i is image pixel first + step * i (step -1 when mirrored); the
    image has `size` pixels, the canvas's others are the mean fill."""
    first: int
    step: int
    size: int

    def image_index(self, patch_index):
        return self.first + self.step * patch_index


def _taps_reading_image(taps: Taps, axis: _Axis) -> tuple[slice, Taps]:
    """(the run of output pixels whose taps read a pixel of the image, their taps). The taps
    and `axis` are monotonic, so those output pixels form one run."""
    reads = np.zeros(len(taps.low), bool)
    for patch_index in (taps.low, taps.high):
        position = axis.image_index(patch_index)
        reads |= (position >= 0) & (position < axis.size)
    hits = np.flatnonzero(reads)
    run = slice(hits[0], hits[-1] + 1) if hits.size else slice(0, 0)
    return run, Taps(taps.low[run], taps.high[run], taps.weight[run])


def _read_pixels(taps: Taps) -> tuple[np.ndarray, Taps]:
    """(the sorted distinct indices the taps read, the taps as indices into that list)."""
    # Taps span a short range: marking it is cheaper than np.unique's sort.
    first = taps.low.min()
    read = np.zeros(taps.high.max() - first + 1, bool)
    read[taps.low - first] = read[taps.high - first] = True
    position = np.cumsum(read) - 1           # index in the list of each marked offset
    return (np.flatnonzero(read) + first,
            Taps(position[taps.low - first], position[taps.high - first], taps.weight))


def _distorted_canvas_pixels(image, image_rows, image_columns, photometric_rng, mean):
    """uint8 [len(image_rows), len(image_columns), 3]: the zoomed-out canvas of the distorted
    image at the given image rows (ascending) and columns (ascending or descending); indices
    outside the image are the mean fill."""
    height, width = image.shape[:2]
    # Monotonic indices: the ones inside the image form one run.
    row_run = np.flatnonzero((image_rows >= 0) & (image_rows < height))
    column_run = np.flatnonzero((image_columns >= 0) & (image_columns < width))
    shown = image[_run_as_slice(image_rows[row_run])]
    columns = _run_as_slice(image_columns[column_run])
    # np.take gathers columns about twice as fast as indexing with an array.
    shown = shown[:, columns] if isinstance(columns, slice) else np.take(shown, columns, axis=1)
    distorted = photometric_distort(shown, photometric_rng)
    if distorted.shape[:2] == (len(image_rows), len(image_columns)):
        return distorted
    pixels = filled_canvas(len(image_rows), len(image_columns), mean)
    if row_run.size and column_run.size:
        pixels[row_run[0]:row_run[-1] + 1, column_run[0]:column_run[-1] + 1] = distorted
    return pixels


def _run_as_slice(indices: np.ndarray):
    """Distinct monotonic `indices` as a slice when they are consecutive (ascending or descending,
    as when the resize enlarges): NumPy then views the pixels instead of gathering them 3 bytes at
    a time, which costs a third as much as distorting them. Other indices are returned as they
    are."""
    if not indices.size or abs(indices[-1] - indices[0]) != indices.size - 1:
        return indices
    step = 1 if indices[-1] >= indices[0] else -1
    stop = indices[-1] + step
    return slice(indices[0], stop if stop >= 0 else None, step)
