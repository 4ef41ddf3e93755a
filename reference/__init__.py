"""Pure-NumPy reference of every SSD box algorithm, written to be read.

Conventions used throughout:
  * Boxes ``[N, 4]`` are corners ``(xmin, ymin, xmax, ymax)`` normalized to
    [0, 1] unless a docstring names another format.
  * Priors (default boxes) and regression targets are in center form
    ``(cx, cy, w, h)``.
  * Labels: 0 is background, object classes are 1..C.
  * Dimension letters: B batch, P priors, G ground-truth boxes, K detections,
    C object classes (C + 1 logits with background).

Liu et al., "SSD: Single Shot MultiBox Detector", ECCV 2016 (arXiv:1512.02325).
"""
