"""Default boxes ("priors"), SSD paper section 2.2, "Choosing scales and aspect
ratios for default boxes".

Every cell of every feature map gets a few boxes centred on it. Map k has scale
s_k (box side as a fraction of the image); for each aspect ratio a_r the box is
w = s_k * sqrt(a_r), h = s_k / sqrt(a_r). Ratio 1 gets one extra box of side
s'_k = sqrt(s_k * s_{k+1}).
"""
import dataclasses
import math

import numpy as np

PRIOR_CLIP_MODES = ("none", "corners", "wh", "center_form")


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """Geometry of the default boxes of one SSD model, in pixels.

    Attributes:
      image_size: side of the square model input.
      feature_map_sizes: side |f_k| of each square feature map, largest first.
      steps: distance in pixels between neighbouring cell centres of map k
        (the Caffe release uses rounded values, e.g. 8 for 300/38).
      min_sizes: side s_k * image_size of the ratio-1 box of map k.
      max_sizes: s_{k+1} * image_size; the extra ratio-1 box of map k has side
        sqrt(min_size * max_size).
      aspect_ratios: per map, the ratios r > 1 used besides 1; each gives a box
        of ratio r and one of ratio 1/r.
      clip: how priors are kept inside the image, one of `PRIOR_CLIP_MODES`:
        "none" (the Caffe release, mmdetection), "corners" (clip each prior's corners to
        [0, 1]), "wh" (clamp w and h to [0, 1], centres untouched: torchvision) or
        "center_form" (clamp all four of cx, cy, w, h to [0, 1]: ssd.pytorch, lufficc/SSD).
    """

    image_size: int
    feature_map_sizes: tuple[int, ...]
    steps: tuple[float, ...]
    min_sizes: tuple[float, ...]
    max_sizes: tuple[float, ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    clip: str = "none"

    def __post_init__(self):
        if self.clip not in PRIOR_CLIP_MODES:
            raise ValueError(f"PriorConfig.clip must be one of {PRIOR_CLIP_MODES}, "
                             f"got {self.clip!r}")
        fields = ("steps", "min_sizes", "max_sizes", "aspect_ratios")
        for field in fields:
            if len(getattr(self, field)) != len(self.feature_map_sizes):
                raise ValueError(
                    f"PriorConfig.{field} has {len(getattr(self, field))} entries but "
                    f"there are {len(self.feature_map_sizes)} feature maps")
        for ratios in self.aspect_ratios:
            if any(r <= 0 for r in ratios):
                raise ValueError(f"aspect ratios must be positive, got {ratios}")

    @property
    def boxes_per_location(self) -> tuple[int, ...]:
        """Number of default boxes per cell of each map: 2 ratio-1 boxes + 2 per ratio."""
        return tuple(2 + 2 * len(ratios) for ratios in self.aspect_ratios)

    @property
    def num_priors(self) -> int:
        return sum(f * f * n for f, n in zip(self.feature_map_sizes, self.boxes_per_location))

    @classmethod
    def from_paper(cls, image_size, feature_map_sizes, aspect_ratios,
                   s_min=0.2, s_max=0.9, clip="none"):
        """Scales from the paper's formula (eq. 4):

            s_k = s_min + (s_max - s_min) / (m - 1) * (k - 1),   k in [1, m]

        with cell centres ((j + 0.5) / |f_k|, (i + 0.5) / |f_k|). The extra ratio-1
        box of the last map needs s_{m+1}, taken from the same line (k = m + 1).
        """
        m = len(feature_map_sizes)
        if m < 2:
            raise ValueError("the paper's scale formula needs at least 2 feature maps")
        scales = [s_min + (s_max - s_min) * k / (m - 1) for k in range(m + 1)]
        return cls(
            image_size=image_size,
            feature_map_sizes=tuple(feature_map_sizes),
            steps=tuple(image_size / f for f in feature_map_sizes),
            min_sizes=tuple(s * image_size for s in scales[:-1]),
            max_sizes=tuple(s * image_size for s in scales[1:]),
            aspect_ratios=tuple(tuple(r) for r in aspect_ratios),
            clip=clip,
        )


# The original Caffe release's VOC models (weiliu89/caffe, ssd_pascal.py).
SSD300 = PriorConfig(
    image_size=300,
    feature_map_sizes=(38, 19, 10, 5, 3, 1),
    steps=(8, 16, 32, 64, 100, 300),
    min_sizes=(30, 60, 111, 162, 213, 264),
    max_sizes=(60, 111, 162, 213, 264, 315),
    aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
)

SSD512 = PriorConfig(
    image_size=512,
    feature_map_sizes=(64, 32, 16, 8, 4, 2, 1),
    steps=(8, 16, 32, 64, 128, 256, 512),
    min_sizes=(35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8),
    max_sizes=(76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6),
    aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)),
)

# The COCO default boxes of the Caffe release (ssd_coco.py; paper section 3.4): smaller
# objects than VOC's, so conv4_3 at 0.07 and the rest 0.15..0.87 (SSD300), 0.04 and 0.1..0.9
# (SSD512), the same maps, steps and aspect ratios.
SSD300_COCO = dataclasses.replace(
    SSD300, min_sizes=(21, 45, 99, 153, 207, 261), max_sizes=(45, 99, 153, 207, 261, 315))
SSD512_COCO = dataclasses.replace(
    SSD512, min_sizes=(20.48, 51.2, 133.12, 215.04, 296.96, 378.88, 460.8),
    max_sizes=(51.2, 133.12, 215.04, 296.96, 378.88, 460.8, 542.72))


def cell_boxes(config: PriorConfig, k: int) -> list[tuple[float, float]]:
    """(w, h) of the default boxes of one cell of map k, normalized to [0, 1].

    Order: ratio-1 box of side s_k, extra ratio-1 box of side sqrt(s_k s_{k+1}),
    then for each ratio r the box of ratio r and the box of ratio 1/r.
    """
    s_k = config.min_sizes[k] / config.image_size
    s_extra = math.sqrt(config.min_sizes[k] * config.max_sizes[k]) / config.image_size
    sizes = [(s_k, s_k), (s_extra, s_extra)]
    for r in config.aspect_ratios[k]:
        sizes.append((s_k * math.sqrt(r), s_k / math.sqrt(r)))
        sizes.append((s_k / math.sqrt(r), s_k * math.sqrt(r)))
    return sizes


def prior_boxes(config: PriorConfig) -> np.ndarray:
    """All default boxes of a model.

    Returns:
      [P, 4] float32 center form (cx, cy, w, h), normalized to [0, 1]; ordered
      feature map by feature map, then cell row-major (row i = y first, then
      column j = x), then the boxes of the cell as in `cell_boxes`. This is the
      order of the model's `loc` and `conf_logits` outputs.
    """
    priors = []
    for k, f in enumerate(config.feature_map_sizes):
        step = config.steps[k] / config.image_size
        sizes = cell_boxes(config, k)
        for i in range(f):
            for j in range(f):
                cx, cy = (j + 0.5) * step, (i + 0.5) * step
                priors.extend((cx, cy, w, h) for w, h in sizes)
    priors = clip_priors(np.asarray(priors, dtype=np.float64), config.clip)
    return priors.astype(np.float32)


def clip_priors(boxes: np.ndarray, mode: str) -> np.ndarray:
    """Center-form priors [P, 4] kept inside the image as `mode` says (see `PriorConfig.clip`).

    "corners" clips the corners, which keeps a box hanging over the border where it is;
    the peers' "wh" and "center_form" clamp the center-form numbers themselves, which
    shrinks such a box around its centre (and, for "center_form", moves a centre beyond
    the image back onto its edge).
    """
    if mode == "none":
        return boxes
    if mode == "wh":
        return np.concatenate([boxes[:, :2], np.clip(boxes[:, 2:], 0.0, 1.0)], axis=1)
    if mode == "center_form":
        return np.clip(boxes, 0.0, 1.0)
    if mode == "corners":
        half = boxes[:, 2:] / 2
        lo = np.clip(boxes[:, :2] - half, 0.0, 1.0)
        hi = np.clip(boxes[:, :2] + half, 0.0, 1.0)
        return np.concatenate([(lo + hi) / 2, hi - lo], axis=1)
    raise ValueError(f"prior clip mode must be one of {PRIOR_CLIP_MODES}, got {mode!r}")
