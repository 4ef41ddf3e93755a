"""Input checks shared by the reference and the public JAX entry points.

Every check raises ValueError with a message that names the argument and, where
there is one, the offending entry, so bad input never becomes a silent wrong
answer or a crash deep inside XLA.
"""
import numbers

import numpy as np


def check_boxes(boxes, name: str, *, batch_dims: int = 0, strict: bool = False) -> np.ndarray:
    """Checks an array of boxes of shape [*batch, N, 4] and returns it as a NumPy array.

    Args:
      boxes: array-like, `batch_dims` leading dimensions then [N, 4].
      name: argument name used in error messages.
      batch_dims: number of leading batch dimensions expected.
      strict: also require xmax > xmin and ymax > ymin (ground truth boxes).
    """
    boxes = np.asarray(boxes)
    if boxes.ndim != batch_dims + 2 or boxes.shape[-1] != 4:
        expected = "[" + "".join(f"{d}, " for d in "BG"[:batch_dims]) + "N, 4]"
        raise ValueError(f"{name} must have shape {expected}, got {boxes.shape}")
    if not np.issubdtype(boxes.dtype, np.number) or np.issubdtype(boxes.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {boxes.dtype}")
    _check_finite(boxes, name)
    if strict:
        bad = np.argwhere((boxes[..., 2] <= boxes[..., 0]) | (boxes[..., 3] <= boxes[..., 1]))
        if bad.size:
            index = tuple(int(i) for i in bad[0])
            raise ValueError(
                f"{name}[{', '.join(map(str, index))}] = {boxes[index].tolist()} is degenerate: "
                "boxes must be (xmin, ymin, xmax, ymax) with xmax > xmin and ymax > ymin")
    return boxes


def check_labels(labels, name: str, *, shape: tuple, num_classes: int | None = None,
                 allow_background: bool = False) -> np.ndarray:
    """Checks integer class labels of the given shape (1..C, or 0..C with background)."""
    labels = np.asarray(labels)
    if labels.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise ValueError(f"{name} must hold integer class labels, got dtype {labels.dtype}")
    low = 0 if allow_background else 1
    bad = np.argwhere((labels < low) | ((labels > num_classes) if num_classes is not None else False))
    if bad.size:
        index = tuple(int(i) for i in bad[0])
        allowed = f"{low}..{num_classes}" if num_classes is not None else f">= {low}"
        raise ValueError(f"{name}[{', '.join(map(str, index))}] = {labels[index]} is out of range: "
                         f"labels must be in {allowed} (0 is background)")
    return labels.astype(np.int64)


def check_array(x, name: str, *, shape: tuple, finite: bool = True) -> np.ndarray:
    """Checks a float array's shape (None matches any size) and that it holds no NaN/inf."""
    x = np.asarray(x)
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        pretty = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {pretty}, got {x.shape}")
    if finite:
        _check_finite(x, name)
    return x


def check_padded_ground_truth(gt_boxes, gt_labels, gt_mask, *, batch_dims: int,
                              num_classes=None):
    """Checks ground truth padded to G slots: [*batch, G, 4] boxes, [*batch, G] labels and mask.

    Only rows where gt_mask is True must be valid ground truth (strict boxes,
    labels in 1..C); padded rows need only be finite. Error messages index the
    full padded arrays. Returns (gt_boxes, gt_labels, gt_mask) as NumPy arrays.
    """
    gt_boxes = check_boxes(gt_boxes, "gt_boxes", batch_dims=batch_dims)
    slots = gt_boxes.shape[:-1]
    gt_mask = np.asarray(gt_mask)
    if gt_mask.shape != slots:
        raise ValueError(f"gt_mask must have shape {slots} like gt_boxes[..., 0], "
                         f"got {gt_mask.shape}")
    gt_mask = check_mask(gt_mask, "gt_mask")
    # Stand-ins for padded rows so that the checks see only real ground truth.
    unit_box = np.array([0.0, 0.0, 1.0, 1.0])
    check_boxes(np.where(gt_mask[..., None], gt_boxes, unit_box), "gt_boxes",
                batch_dims=batch_dims, strict=True)
    gt_labels = np.asarray(gt_labels)
    if gt_labels.shape == slots:
        gt_labels = np.where(gt_mask, gt_labels, 1)
    gt_labels = check_labels(gt_labels, "gt_labels", shape=slots, num_classes=num_classes)
    return gt_boxes, gt_labels, gt_mask


def check_multibox_inputs(loc_pred, conf_logits, loc_target, labels, neg_pos_ratio, alpha):
    """Validates `multibox_loss`'s arguments (reference and JAX); returns NumPy arrays."""
    conf_logits = check_array(conf_logits, "conf_logits", shape=(None, None, None))
    batch, num_priors, num_logits = conf_logits.shape
    if num_logits < 2:
        raise ValueError(f"conf_logits needs C + 1 >= 2 entries (background and at least one "
                         f"class) on its last axis, got shape {conf_logits.shape}")
    loc_pred = check_array(loc_pred, "loc_pred", shape=(batch, num_priors, 4))
    loc_target = check_array(loc_target, "loc_target", shape=(batch, num_priors, 4))
    labels = check_labels(labels, "labels", shape=(batch, num_priors),
                          num_classes=num_logits - 1, allow_background=True)
    check_neg_pos_ratio(neg_pos_ratio)
    if not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite non-negative number, got {alpha!r}")
    return loc_pred, conf_logits, loc_target, labels


def check_neg_pos_ratio(neg_pos_ratio) -> int:
    """Checks the negatives-per-positive count: an integer >= 0 (3 and 3.0 both pass)."""
    if (isinstance(neg_pos_ratio, bool) or not isinstance(neg_pos_ratio, numbers.Real)
            or not float(neg_pos_ratio).is_integer() or neg_pos_ratio < 0):
        raise ValueError(f"neg_pos_ratio must be an integer >= 0, got {neg_pos_ratio!r}")
    return int(neg_pos_ratio)


def check_mask(mask, name: str) -> np.ndarray:
    """Checks a validity mask: booleans, or integers / floats that are all 0 or 1."""
    mask = np.asarray(mask)
    if mask.dtype != bool and not (np.issubdtype(mask.dtype, np.number)
                                   and np.all((mask == 0) | (mask == 1))):
        raise ValueError(f"{name} must be boolean (or 0/1), got dtype {mask.dtype}"
                         + (f" with values {np.unique(mask)[:5].tolist()}"
                            if np.issubdtype(mask.dtype, np.number) else ""))
    return mask.astype(bool)


def check_threshold(value: float, name: str) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def check_positive_int(value, name: str) -> int:
    """Checks a count such as top_k: an integer >= 1 (bools are rejected)."""
    if isinstance(value, bool) or not float(value).is_integer() or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_finite(x, name):
    if x.size and not np.all(np.isfinite(x)):
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
        raise ValueError(f"{name}[{', '.join(map(str, index))}] = {x[index]} is not finite")
