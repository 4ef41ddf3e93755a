"""Fast twin of `reference.augment.ssd_augment`: the same output, bit for bit, for less work.

The reference distorts the colours of the whole image, pastes it on a canvas of up to 16 times its
area, crops a patch of that, mirrors it and resizes it. But the bilinear resize reads only two
rows and two columns of the patch per output row and column. So here the geometry is settled
first, and only the pixels the resize reads are fetched from the image, distorted and
interpolated; the canvas is never built, and output pixels that read only its fill are set to the
fill colour without interpolating. The two agree exactly because
  * every photometric step maps each pixel on its own (`reference.augment.photometric_distort`),
    so distorting some pixels of the image gives those pixels of the distorted image;
  * the canvas fill is the undistorted mean colour in both: the reference distorts before it
    zooms out;
  * the interpolation (`reference.augment.interpolate`) reads the same values with the same
    weights, from a compact array instead of the mirrored patch, and between two fill pixels
    it gives the fill exactly (m + (m - m) * w == m);
  * each step draws from its own generator (`reference.augment.split_rng`), and the geometric
    choices depend only on the image size and the boxes, so making them first changes nothing.
tests/test_augment.py checks the equality.
"""
import functools
from typing import NamedTuple

import numpy as np

from reference import augment as reference_augment
from reference.augment import (MEAN_RGB, Taps, bilinear_taps, check_example,
                               crop_boxes, expand_boxes, filled_canvas, flip_boxes, interpolate,
                               photometric_distort, sample_crop, sample_expansion, sample_flip,
                               split_rng)


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
