"""Box regression targets: offsets of a box relative to a default box.

SSD paper, eq. 2: for a ground-truth box g and default box d, both in center
form, the localization target is

    g^cx = (g_cx - d_cx) / d_w      g^w = log(g_w / d_w)
    g^cy = (g_cy - d_cy) / d_h      g^h = log(g_h / d_h)

The Caffe release (and every port since) also divides the center offsets by
variance[0] = 0.1 and the size offsets by variance[1] = 0.2, which scales the
targets to roughly unit spread. `decode` is the exact inverse of `encode`.
"""
import numpy as np

from reference.boxes import center_to_corners, corners_to_center
from reference.validation import check_array, check_boxes


def encode(matched_boxes, priors, variances=(0.1, 0.2)) -> np.ndarray:
    """Regression targets of boxes relative to priors (eq. 2 divided by the variances).

    Args:
      matched_boxes: [..., P, 4] corners (xmin, ymin, xmax, ymax) with positive
        width and height, one per prior (e.g. from `matching.match`).
      priors: [P, 4] center form (cx, cy, w, h).
      variances: (center variance, size variance), both positive.
    Returns:
      [..., P, 4] float64 offsets (t_cx, t_cy, t_w, t_h).
    """
    matched_boxes, priors, (var_center, var_size) = check_encode_inputs(
        matched_boxes, priors, variances)
    boxes = corners_to_center(matched_boxes)
    center = (boxes[..., :2] - priors[:, :2]) / (var_center * priors[:, 2:])
    size = np.log(boxes[..., 2:] / priors[:, 2:]) / var_size
    return np.concatenate([center, size], axis=-1)


def decode(loc, priors, variances=(0.1, 0.2)) -> np.ndarray:
    """Boxes from regression offsets: the inverse of `encode`.

    Args:
      loc: [..., P, 4] offsets (t_cx, t_cy, t_w, t_h), e.g. the model's output.
      priors: [P, 4] center form (cx, cy, w, h).
      variances: the (center variance, size variance) used by `encode`.
    Returns:
      [..., P, 4] float64 corners (xmin, ymin, xmax, ymax), not clipped.
    """
    loc, priors, (var_center, var_size) = check_decode_inputs(loc, priors, variances)
    center = priors[:, :2] + loc[..., :2] * var_center * priors[:, 2:]
    size = priors[:, 2:] * np.exp(loc[..., 2:] * var_size)
    return center_to_corners(np.concatenate([center, size], axis=-1))


def check_encode_inputs(matched_boxes, priors, variances):
    """Checks `encode`'s arguments; returns them as float64 arrays and a pair of floats."""
    priors = check_priors(priors)
    matched_boxes = check_boxes(matched_boxes, "matched_boxes",
                                batch_dims=max(np.ndim(matched_boxes) - 2, 0), strict=True)
    _check_one_box_per_prior(matched_boxes, priors, "matched_boxes")
    return matched_boxes.astype(np.float64), priors, check_variances(variances)


def check_decode_inputs(loc, priors, variances):
    """Checks `decode`'s arguments; returns them as float64 arrays and a pair of floats."""
    priors = check_priors(priors)
    loc = check_array(loc, "loc", shape=(None,) * max(np.ndim(loc) - 1, 1) + (4,))
    _check_one_box_per_prior(loc, priors, "loc")
    return loc.astype(np.float64), priors, check_variances(variances)


def check_priors(priors) -> np.ndarray:
    """Checks [P, 4] center-form priors (finite, positive width and height); returns float64."""
    priors = check_array(priors, "priors", shape=(None, 4)).astype(np.float64)
    bad = np.argwhere(np.any(priors[:, 2:] <= 0, axis=1))
    if bad.size:
        p = int(bad[0, 0])
        raise ValueError(f"priors[{p}] = {priors[p].tolist()} must be (cx, cy, w, h) "
                         "with positive width and height")
    return priors


def check_variances(variances) -> tuple[float, float]:
    """Checks the (center variance, size variance) pair: two positive finite numbers."""
    values = np.asarray(variances, dtype=np.float64)
    if values.shape != (2,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"variances must be two positive numbers, got {variances}")
    return float(values[0]), float(values[1])


def _check_one_box_per_prior(boxes, priors, name):
    if boxes.shape[-2] != len(priors):
        raise ValueError(f"{name} has {boxes.shape[-2]} boxes per image (shape {boxes.shape}) "
                         f"but there are {len(priors)} priors")
