"""Resizing an image to the detector's square input, the way each implementation does it.

A trained detector gives its own detections only when it sees the pixels it saw in its own
evaluation, and bilinear resizes differ in their rounding:

- "uint8": `reference.augment.resize`, float bilinear rounded to uint8 (this project's
  training and evaluation pipeline).
- "float": the same taps, not rounded: float32 pixels (torchvision's `GeneralizedRCNNTransform`,
  `F.interpolate(mode="bilinear", align_corners=False)` without antialiasing).
- "opencv": `cv2.resize(image, (S, S))` with INTER_LINEAR on uint8, which works in fixed point
  (ssd.pytorch, lufficc/SSD and mmdetection all resize this way).

All three map output pixel centre i + 1/2 to input position (i + 1/2) * in / out - 1/2; they
ignore the aspect ratio (boxes stay normalized to the image, so they need no change).
"""
import numpy as np

from reference.augment import bilinear_taps, resize as resize_uint8

# OpenCV's fixed point: weights are integers out of 2 ** 11 (INTER_RESIZE_COEF_BITS).
OPENCV_WEIGHT_ONE = 2048


def resize_float(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of uint8 [H, W, 3] to float32 [size, size, 3], not rounded."""
    rows = bilinear_taps(image.shape[0], size)
    columns = bilinear_taps(image.shape[1], size)
    pixels = image.astype(np.float32)
    row_weight = rows.weight[:, None, None]
    pixels = pixels[rows.low] * (1 - row_weight) + pixels[rows.high] * row_weight
    column_weight = columns.weight[None, :, None]
    return pixels[:, columns.low] * (1 - column_weight) + pixels[:, columns.high] * column_weight


def opencv_taps(input_size: int, output_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low, high, weights) of OpenCV's INTER_LINEAR along one axis (imgproc/resize.cpp):
    output pixel i reads input pixels low[i] and high[i] with integer weights [i, 2] summing to
    2048. The position is computed in double, then stored as a float32; it is clamped to the
    first and last pixel, where the weight of the other tap is 0."""
    scale = 1.0 / (output_size / input_size)  # OpenCV keeps the inverse of out / in
    position = ((np.arange(output_size) + 0.5) * scale - 0.5).astype(np.float32)
    low = np.floor(position).astype(np.int64)
    fraction = position - low.astype(np.float32)
    outside = (low < 0) | (low >= input_size - 1)
    fraction[outside] = 0
    low = np.clip(low, 0, input_size - 1)
    high = np.minimum(low + 1, input_size - 1)
    weights = np.stack([(np.float32(1) - fraction) * OPENCV_WEIGHT_ONE,
                        fraction * OPENCV_WEIGHT_ONE], axis=1)
    return low, high, np.rint(weights).astype(np.int64)  # cvRound: to nearest, ties to even


def resize_opencv(image: np.ndarray, size: int) -> np.ndarray:
    """OpenCV's uint8 INTER_LINEAR resize of uint8 [H, W, 3] to uint8 [size, size, 3].

    Horizontal pass: integer sums of two pixels times their weights (out of 2048). Vertical
    pass, as OpenCV's SIMD code rounds it: each of the two rows is shifted right by 4, times
    its weight, shifted right by 16; the sum plus 2 is shifted right by 2. Bit-exact with
    OpenCV (4.x, 5.x) when downscaling; when enlarging, OpenCV's vector code differs from this
    by 1 on a few pixels.
    """
    x_low, x_high, x_weights = opencv_taps(image.shape[1], size)
    y_low, y_high, y_weights = opencv_taps(image.shape[0], size)
    pixels = image.astype(np.int64)
    rows = (pixels[:, x_low] * x_weights[None, :, 0, None]
            + pixels[:, x_high] * x_weights[None, :, 1, None])
    top = ((rows[y_low] >> 4) * y_weights[:, 0, None, None]) >> 16
    bottom = ((rows[y_high] >> 4) * y_weights[:, 1, None, None]) >> 16
    return ((top + bottom + 2) >> 2).astype(np.uint8)


RESIZE_MODES = {"uint8": resize_uint8, "float": resize_float, "opencv": resize_opencv}


def resize_image(image: np.ndarray, size: int, mode: str = "uint8") -> np.ndarray:
    """uint8 [H, W, 3] -> [size, size, 3] by the resize `mode` names (see the module
    docstring): uint8 for "uint8" and "opencv", float32 for "float"."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {tuple(RESIZE_MODES)}, got {mode!r}")
    return RESIZE_MODES[mode](image, size)
