"""Box geometry in JAX: twins of `reference.boxes` (same names, same results in float32).

Corners form is (xmin, ymin, xmax, ymax); center form is (cx, cy, w, h).
Degenerate boxes (xmax <= xmin or ymax <= ymin) have area 0 and IoU 0, never NaN.
All functions are jit-able. Shapes and dtypes are checked on every call, under jit too
(ValueError); called on concrete arrays they also run the reference's value checks
(non-finite values), which jit skips: there NaN coordinates give NaN results.
"""
import jax
import jax.numpy as jnp

from reference import boxes as reference_boxes
from reference.validation import check_boxes
from ssd_jax._validation import Shapes, is_concrete


def area(boxes):
    """[..., 4] corners -> [...] areas, 0 for degenerate boxes."""
    boxes = _checked_boxes(boxes)
    return _area(boxes)


def iou(a, b):
    """Pairwise IoU of a [N, 4] and b [M, 4] corners -> [N, M] in [0, 1], computed in the
    wider of the two dtypes and at least float32 (float16 boxes against float32 ones would
    otherwise round past 1)."""
    shapes = Shapes()
    a, b = shapes.check("a", a, "N 4"), shapes.check("b", b, "M 4")
    if is_concrete(a, b):
        check_boxes(a, "a")
        check_boxes(b, "b")
    dtype = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
    return jax.vmap(iou_with_rows, (0, None))(a.astype(dtype), b.astype(dtype).T)


def iou_with_rows(box, rows):
    """IoU of one box [4] with M boxes given as coordinate rows [4, M] -> [M].

    The layout keeps each coordinate contiguous, and the degenerate case (union 0,
    so intersection 0) is a max rather than a compare: 0 / tiny = 0, never NaN.
    Both matter on XLA:CPU, where compares over large arrays are slow; matching
    calls this once per ground-truth box.
    """
    xmin, ymin, xmax, ymax = box
    rows_xmin, rows_ymin, rows_xmax, rows_ymax = rows
    intersection = (
        jnp.maximum(jnp.minimum(xmax, rows_xmax) - jnp.maximum(xmin, rows_xmin), 0.0)
        * jnp.maximum(jnp.minimum(ymax, rows_ymax) - jnp.maximum(ymin, rows_ymin), 0.0))
    box_area = jnp.maximum(xmax - xmin, 0.0) * jnp.maximum(ymax - ymin, 0.0)
    rows_area = jnp.maximum(rows_xmax - rows_xmin, 0.0) * jnp.maximum(rows_ymax - rows_ymin, 0.0)
    union = box_area + rows_area - intersection
    return intersection / jnp.maximum(union, jnp.finfo(union.dtype).tiny)


def corners_to_center(boxes):
    """[..., 4] corners (xmin, ymin, xmax, ymax) -> [..., 4] center form (cx, cy, w, h)."""
    boxes = _checked_boxes(boxes)
    top_left, bottom_right = boxes[..., :2], boxes[..., 2:]
    return jnp.concatenate([(top_left + bottom_right) / 2, bottom_right - top_left], axis=-1)


def center_to_corners(boxes):
    """[..., 4] center form (cx, cy, w, h) -> [..., 4] corners (xmin, ymin, xmax, ymax)."""
    boxes = _checked_boxes(boxes)
    center, half_size = boxes[..., :2], boxes[..., 2:] / 2
    return jnp.concatenate([center - half_size, center + half_size], axis=-1)


def _checked_boxes(boxes) -> jax.Array:
    """[..., 4] boxes as a JAX array: shape and dtype checked always, values when concrete."""
    boxes = Shapes().check("boxes", boxes, "... 4")
    if is_concrete(boxes):
        reference_boxes.check_box_array(boxes, "boxes")
    return boxes


def _area(boxes):
    width = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    height = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    return width * height
