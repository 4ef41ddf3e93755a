"""Batched inference: the forward pass and fixed-size postprocessing compiled as one
function, and the settings that say how a detector turns its outputs into detections."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reference.priors import prior_boxes
from ssd_jax.data.resize import RESIZE_MODES
from reference.validation import check_positive_int, check_threshold
from ssd_jax import platform
from ssd_jax.nms import detect
from ssd_jax.sharding import batch_split, per_device, replicated

CANDIDATE_MODES = ("per_class", "per_level")


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """How images become detections; a checkpoint stores one, so a converted peer's detector
    gives that peer's output (the defaults are the paper's section 3.7 and the Caffe release's,
    but for `clip_boxes`: Caffe does not clip).

    Attributes:
      score_threshold: a detection needs a class probability above it.
      iou_threshold: per-class NMS overlap above which the lower-scored box is dropped.
      pre_nms_top_k: most NMS candidates, per class ("per_class") or per feature map
        ("per_level"); None: no cap.
      top_k: most detections per image; None: no cap (every NMS survivor).
      clip_boxes: clip decoded boxes to the image before NMS (torchvision, mmdetection);
        the Caffe release, ssd.pytorch and lufficc/SSD do not.
      candidates: "per_class": each class's best `pre_nms_top_k` boxes enter NMS (Caffe,
        torchvision, ssd.pytorch); "per_level": each feature map's best `pre_nms_top_k`
        (prior, class) pairs do (mmdetection).
      drop_empty_boxes: drop boxes of zero width or height before NMS (mmdetection).
      resize: how an image is resized to the model's input, one of
        `ssd_jax.data.resize.RESIZE_MODES`: "uint8" (bilinear, rounded to uint8, as the
        training pipeline does), "float" (bilinear, unrounded: torchvision) or "opencv"
        (OpenCV's fixed-point uint8 INTER_LINEAR: ssd.pytorch, lufficc/SSD, mmdetection).
    """

    score_threshold: float = 0.01
    iou_threshold: float = 0.45
    pre_nms_top_k: int | None = 400
    top_k: int | None = 200
    clip_boxes: bool = True
    candidates: str = "per_class"
    drop_empty_boxes: bool = False
    resize: str = "uint8"

    def __post_init__(self):
        check_threshold(self.score_threshold, "score_threshold")
        check_threshold(self.iou_threshold, "iou_threshold")
        for name in ("pre_nms_top_k", "top_k"):
            if getattr(self, name) is not None:
                check_positive_int(getattr(self, name), name)
        for name in ("clip_boxes", "drop_empty_boxes"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.candidates not in CANDIDATE_MODES:
            raise ValueError(f"candidates must be one of {CANDIDATE_MODES}, got "
                             f"{self.candidates!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {tuple(RESIZE_MODES)}, got {self.resize!r}")

    @classmethod
    def from_dict(cls, fields: dict) -> "InferenceConfig":
        """The settings of a checkpoint's JSON record, with a clear error for unknown names."""
        unknown = sorted(set(fields) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown inference settings {unknown}")
        return cls(**fields)

    def detect_options(self, model_config) -> dict:
        """Keyword arguments of `nms.detect` for a model of `model_config`."""
        level_sizes = None
        if self.candidates == "per_level":
            priors = model_config.priors
            level_sizes = tuple(f * f * n for f, n in zip(priors.feature_map_sizes,
                                                         priors.boxes_per_location))
        return dict(score_threshold=self.score_threshold, iou_threshold=self.iou_threshold,
                    top_k=self.top_k, pre_nms_top_k=self.pre_nms_top_k,
                    clip_boxes=self.clip_boxes, level_sizes=level_sizes,
                    drop_empty_boxes=self.drop_empty_boxes)


def make_predict_fn(graphdef, model_config, settings: InferenceConfig = InferenceConfig(),
                    mesh=None):
    """Returns jitted `predict(params, rest, images[B,S,S,3]) -> dict` of
    boxes [B,K,4] (normalized corners), scores [B,K], labels [B,K] (1..C), valid [B,K]
    for the model of `graphdef` and its ModelConfig `model_config`.

    With a `mesh` (`sharding.data_mesh`), the images are split over its devices along B
    (pass them as `sharding.shard_global_batch` makes them; B a multiple of the device count)
    with the model replicated, and the (small) outputs come back replicated, so that every
    process can read all of them.

    The jit carries the platform's compiler options (`platform.compiler_options`), which JAX
    allows on a top-level jit only: to call predict inside a jit of your own, take
    `predict_function`.
    """
    predict = predict_function(graphdef, model_config, settings, mesh)
    if mesh is None:
        return jax.jit(predict, compiler_options=platform.compiler_options(inference=True))
    return jax.jit(predict, in_shardings=(replicated(mesh), replicated(mesh), batch_split(mesh)),
                   out_shardings=replicated(mesh),
                   compiler_options=platform.compiler_options(mesh.devices.flat, inference=True))


def predict_function(graphdef, model_config, settings: InferenceConfig = InferenceConfig(),
                     mesh=None):
    """`make_predict_fn`'s function before `jax.jit`, for callers that jit it inside their
    own function (a top-level jit alone takes the platform's compiler options)."""
    options = settings.detect_options(model_config)
    priors = jnp.asarray(prior_boxes(model_config.priors))

    def detect_one(loc, conf_logits):
        return detect(loc, conf_logits, priors, **options)

    # Over a mesh each device runs detect (NMS loops) on its own images only.
    detect_batch = jax.vmap(detect_one) if mesh is None else per_device(jax.vmap(detect_one),
                                                                         mesh)

    def predict(params, rest, images):
        loc, conf_logits = nnx.merge(graphdef, params, rest)(images)
        boxes, scores, labels, valid = detect_batch(loc, conf_logits)
        return dict(boxes=boxes, scores=scores, labels=labels, valid=valid)

    return predict


def unbatch_detections(outputs: dict, keep=None) -> list[dict]:
    """Splits a host copy of `predict`'s output into one dict per image, dropping the
    padding (invalid detections, and images whose `keep` flag is False)."""
    outputs = jax.device_get(outputs)
    keep = np.ones(len(outputs["valid"]), bool) if keep is None else keep
    return [{key: outputs[key][i][outputs["valid"][i]] for key in ("boxes", "scores", "labels")}
            for i in np.flatnonzero(keep)]
