"""Box regression targets in JAX: twins of `reference.encoding` (paper eq. 2 with variances).

jit-able. Shapes and dtypes are checked on every call, under jit too (ValueError); on
concrete arrays `encode` and `decode` also run the reference's value checks, which jit skips.
"""
import jax.numpy as jnp

from reference import encoding as reference_encoding
from ssd_jax._validation import Shapes, is_concrete
from ssd_jax.boxes import center_to_corners, corners_to_center


def encode(matched_boxes, priors, variances=(0.1, 0.2)):
    """Regression targets of boxes relative to priors.

    Args:
      matched_boxes: [..., P, 4] corners (xmin, ymin, xmax, ymax), positive
        width and height.
      priors: [P, 4] center form (cx, cy, w, h).
      variances: (center variance, size variance).
    Returns:
      [..., P, 4] float32 offsets (t_cx, t_cy, t_w, t_h).
    """
    shapes = Shapes()
    priors = shapes.check("priors", priors, "P 4")
    matched_boxes = shapes.check("matched_boxes", matched_boxes, "... P 4")
    if is_concrete(matched_boxes, priors, variances):
        reference_encoding.check_encode_inputs(matched_boxes, priors, variances)
    var_center, var_size = variances
    boxes = corners_to_center(matched_boxes)
    center = (boxes[..., :2] - priors[:, :2]) / (var_center * priors[:, 2:])
    size = jnp.log(boxes[..., 2:] / priors[:, 2:]) / var_size
    return jnp.concatenate([center, size], axis=-1)


def decode(loc, priors, variances=(0.1, 0.2)):
    """Boxes from regression offsets, the inverse of `encode`.

    Args:
      loc: [..., P, 4] offsets (t_cx, t_cy, t_w, t_h).
      priors: [P, 4] center form (cx, cy, w, h).
      variances: the (center variance, size variance) used by `encode`.
    Returns:
      [..., P, 4] float32 corners (xmin, ymin, xmax, ymax), not clipped.
    """
    shapes = Shapes()
    priors = shapes.check("priors", priors, "P 4")
    loc = shapes.check("loc", loc, "... P 4")
    if is_concrete(loc, priors, variances):
        reference_encoding.check_decode_inputs(loc, priors, variances)
    var_center, var_size = variances
    center = priors[:, :2] + loc[..., :2] * var_center * priors[:, 2:]
    size = priors[:, 2:] * jnp.exp(loc[..., 2:] * var_size)
    return center_to_corners(jnp.concatenate([center, size], axis=-1))
