"""Fast twin of `reference.augment.ssd_augment`: the same output, bit for bit, for less work.

The reference distorts the colours of the whole image, pastes it on a canvas of up to 16 times its
area, crops a patch of that, mirrors it and resizes it. But the bilinear resize reads only two
rows and two columns of the patch per output row and column. So here the geometry is settled
first, and only the pixels the resize reads are fetched from the image, distorted and
interpolated; the canvas is never built. The two agree exactly because
  * every photometric step maps each pixel on its own (`reference.augment.photometric_distort`),
    so distorting some pixels of the image gives those pixels of the distorted image;
  * the canvas fill is the undistorted mean colour in both: the reference distorts before it
    zooms out;
  * the interpolation (`reference.augment.interpolate`) reads the same values with the same
    weights, from a compact array instead of the mirrored patch;
  * each step draws from its own generator (`reference.augment.split_rng`), and the geometric
    choices depend only on the image size and the boxes, so making them first changes nothing.
tests/test_augment.py checks the equality.
"""
import functools

import numpy as np

from reference import augment as reference_augment
from reference.augment import (MEAN_RGB, Expansion, Taps, bilinear_taps, check_example,
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
    rows, row_taps = _read_pixels(bilinear_taps(bottom - top, image_size))
    columns, column_taps = _read_pixels(bilinear_taps(right - left, image_size))
    # Canvas coordinates of what the resize reads; column c of the mirrored patch is canvas
    # column right - 1 - c.
    canvas_columns = right - 1 - columns if flipped else left + columns
    pixels = _distorted_canvas_pixels(image, expansion, top + rows, canvas_columns,
                                      photometric_rng, mean)
    return {**example, "image": interpolate(pixels, row_taps, column_taps),
            "boxes": flip_boxes(boxes) if flipped else boxes,
            "labels": labels[kept], "difficult": difficult[kept]}


def ssd_train_transform(image_size: int, mean=MEAN_RGB):
    """`reference.augment.ssd_train_transform` with the fast `ssd_augment`: a picklable
    `transform(example, rng)` for `ssd_jax.data.pipeline.make_train_loader`."""
    checked = reference_augment.ssd_train_transform(image_size, mean).keywords
    return functools.partial(ssd_augment, **checked)


def _read_pixels(taps: Taps) -> tuple[np.ndarray, Taps]:
    """(the sorted distinct indices the taps read, the taps as indices into that list)."""
    indices, inverse = np.unique(np.concatenate([taps.low, taps.high]), return_inverse=True)
    low, high = np.split(inverse.reshape(-1), 2)
    return indices, Taps(low, high, taps.weight)


def _distorted_canvas_pixels(image, expansion: Expansion, rows, columns, photometric_rng, mean):
    """uint8 [len(rows), len(columns), 3]: the zoomed-out canvas of the distorted image at the
    given canvas rows (ascending) and columns (ascending or descending)."""
    height, width = image.shape[:2]
    image_rows, image_columns = rows - expansion.top, columns - expansion.left
    # Monotonic indices: the ones inside the image form one run.
    row_run = np.flatnonzero((image_rows >= 0) & (image_rows < height))
    column_run = np.flatnonzero((image_columns >= 0) & (image_columns < width))
    shown = np.take(image[image_rows[row_run]], image_columns[column_run], axis=1)
    distorted = photometric_distort(shown, photometric_rng)
    if distorted.shape[:2] == (len(rows), len(columns)):
        return distorted
    pixels = filled_canvas(len(rows), len(columns), mean)
    if row_run.size and column_run.size:
        pixels[row_run[0]:row_run[-1] + 1, column_run[0]:column_run[-1] + 1] = distorted
    return pixels
