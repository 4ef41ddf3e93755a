"""Box geometry: area, intersection over union, and the two box formats.

Corners form is (xmin, ymin, xmax, ymax); center form is (cx, cy, w, h).
SSD matches default boxes to ground truth by IoU, the "jaccard overlap" of the
paper (section 2.2, "Matching strategy"):

    IoU(A, B) = |A intersect B| / |A union B|

A box with xmax <= xmin or ymax <= ymin is degenerate: its area is 0 and its
IoU with anything is 0, never NaN. Results are float64, so the reference can
serve as ground truth for float32 twins.
"""
import numpy as np

from reference.validation import check_array, check_boxes


def check_box_array(boxes, name: str) -> np.ndarray:
    """Checks an array of boxes of shape [..., 4] with finite entries; returns it as float64."""
    boxes = np.asarray(boxes)
    boxes = check_array(boxes, name, shape=(None,) * max(boxes.ndim - 1, 0) + (4,))
    return boxes.astype(np.float64)


def area(boxes) -> np.ndarray:
    """Area of corner-form boxes.

    Args:
      boxes: [..., 4] corners (xmin, ymin, xmax, ymax).
    Returns:
      [...] float64; 0 for degenerate boxes.
    """
    boxes = check_box_array(boxes, "boxes")
    return _area(boxes)


def iou(a, b) -> np.ndarray:
    """Pairwise intersection over union (the paper's jaccard overlap).

    Args:
      a: [N, 4] corners (xmin, ymin, xmax, ymax).
      b: [M, 4] corners.
    Returns:
      [N, M] float64 in [0, 1]; entry (i, j) is IoU(a[i], b[j]), 0 when either
      box is degenerate.
    """
    a = check_boxes(a, "a").astype(np.float64)
    b = check_boxes(b, "b").astype(np.float64)
    # Every pair at once: a's boxes along the first axis, b's along the second.
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    intersection = _area(np.concatenate([top_left, bottom_right], axis=-1))
    union = _area(a)[:, None] + _area(b)[None, :] - intersection
    # Two degenerate boxes have union 0 (and intersection 0): IoU 0, not 0/0.
    return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def corners_to_center(boxes) -> np.ndarray:
    """[..., 4] corners (xmin, ymin, xmax, ymax) -> [..., 4] float64 center form (cx, cy, w, h)."""
    boxes = check_box_array(boxes, "boxes")
    top_left, bottom_right = boxes[..., :2], boxes[..., 2:]
    return np.concatenate([(top_left + bottom_right) / 2, bottom_right - top_left], axis=-1)


def center_to_corners(boxes) -> np.ndarray:
    """[..., 4] center form (cx, cy, w, h) -> [..., 4] float64 corners (xmin, ymin, xmax, ymax)."""
    boxes = check_box_array(boxes, "boxes")
    center, half_size = boxes[..., :2], boxes[..., 2:] / 2
    return np.concatenate([center - half_size, center + half_size], axis=-1)


def _area(boxes):
    # A negative side means the box is empty, not that its area is positive.
    width = np.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    height = np.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    return width * height
