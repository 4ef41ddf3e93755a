"""Input checks shared by the reference and the public JAX entry points.

Every check raises ValueError with a message that names the argument and, where
there is one, the offending entry, so bad input never becomes a silent wrong
answer or a crash deep inside XLA.
"""
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
