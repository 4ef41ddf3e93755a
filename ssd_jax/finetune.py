"""Fine-tuning: a training run that starts from a trained detector (`--init-from CHECKPOINT`).

CHECKPOINT is anything `checkpoint.load_model` reads: a training run's folder (or its
checkpoints/ folder) or a peer's converted detector (`experiments.convert_ssd`).

- The backbone, the extras, the L2Norm scale and the box (loc) heads are loaded as they are.
- The confidence heads output, per default box of a cell, C + 1 logits (`model.flatten_head`:
  the last axis of a conf kernel is anchor-major, [n anchors, C + 1]). The background logit
  and the logits of the classes whose names both label sets hold (case-insensitive, with
  COCO's names for VOC's classes as synonyms) are copied; the other classes keep the model's
  fresh initialization.
- The default boxes must have the same layout (image size, feature maps, anchors per cell and
  their aspect ratios), or `InitFromError` says what differs. Other sizes of the boxes are
  allowed, with a note: the box heads adapt to them during fine-tuning.
- The run's pixel statistics are the checkpoint's (`checkpoint_pixel_stats`): its backbone
  was trained on inputs normalized that way.

`freeze_backbone` wraps an optimizer so that the backbone gets no updates at all.
"""
import collections

import jax
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from ssd_jax.checkpoint import checkpoints_folder, load_meta, load_model
from ssd_jax.flags import ConfigError
from ssd_jax.model import SSD, ModelConfig

# COCO's names (torchvision, mmdetection, lufficc/SSD) -> PASCAL VOC's.
SYNONYMS = {"airplane": "aeroplane", "motorcycle": "motorbike", "couch": "sofa",
            "tv": "tvmonitor", "dining table": "diningtable", "potted plant": "pottedplant"}
# What the shapes of the heads and the meaning of each anchor slot depend on.
LAYOUT_FIELDS = ("image_size", "feature_map_sizes", "boxes_per_location", "aspect_ratios")
SIZE_FIELDS = ("steps", "min_sizes", "max_sizes", "clip")


class InitFromError(ConfigError):
    """--init-from names a checkpoint this run cannot start from; the message says why."""

    def __init__(self, problem: str):
        super().__init__("init_from", problem)


def canonical_class_name(name: str) -> str:
    """The name two label sets are matched by: lower case, single spaces, VOC's spelling."""
    name = " ".join(str(name).lower().split())
    return SYNONYMS.get(name, name)


def shared_classes(source_names, target_names) -> dict[int, int]:
    """{class index here: class index in the checkpoint} for the background (0 -> 0) and every
    class both label sets name (indices 1..C). A name several checkpoint classes hold (the
    "N/A" gaps of torchvision's COCO labels) is ambiguous and carries nothing."""
    names = [canonical_class_name(name) for name in source_names]
    counts = collections.Counter(names)
    index = {name: i for i, name in enumerate(names, 1) if counts[name] == 1}
    shared = {t: index[canonical_class_name(name)] for t, name in enumerate(target_names, 1)
              if canonical_class_name(name) in index}
    return {0: 0, **shared}


def copy_class_logits(fresh: np.ndarray, trained: np.ndarray, shared: dict[int, int],
                      num_anchors: int) -> np.ndarray:
    """A conf head's kernel or bias (last axis: num_anchors * (C + 1), anchor-major) with the
    `shared` classes' outputs of every anchor taken from `trained`, the rest from `fresh`."""
    fresh_rows = np.asarray(fresh).reshape(*fresh.shape[:-1], num_anchors, -1)
    trained_rows = np.asarray(trained).reshape(*trained.shape[:-1], num_anchors, -1)
    here, there = (list(indices) for indices in zip(*sorted(shared.items())))
    rows = fresh_rows.copy()
    rows[..., here] = trained_rows[..., there]
    return rows.reshape(fresh.shape)


def check_layout(source: ModelConfig, target: ModelConfig, path) -> None:
    """Raises InitFromError naming each default-box layout field that differs; notes (does not
    stop on) other box sizes."""
    def differing(fields):
        return [f"{field} {getattr(source.priors, field)} there, {getattr(target.priors, field)} "
                "here" for field in fields
                if getattr(source.priors, field) != getattr(target.priors, field)]

    if layout := differing(LAYOUT_FIELDS):
        raise InitFromError(
            f"{path} has another default-box layout than this run's {target.name} "
            f"({'; '.join(layout)}): its box heads only fit the same layout; pick the --model "
            "(and --image-size) it was trained with")
    if sizes := differing(SIZE_FIELDS):
        tqdm.write(f"note: {path} was trained with other default-box sizes ({'; '.join(sizes)}); "
                   "its box heads adapt to this run's during fine-tuning")


def check_pixel_stats(source: ModelConfig, target: ModelConfig, path) -> None:
    for key in ("pixel_mean", "pixel_std"):
        if not np.allclose(getattr(source, key), getattr(target, key), atol=1e-3):
            raise InitFromError(f"{path} expects {key}={getattr(source, key)} but the model has "
                                f"{getattr(target, key)}: build it with "
                                "get_config(..., **checkpoint_pixel_stats(path))")


def checkpoint_pixel_stats(path) -> dict:
    """{"pixel_mean": (r, g, b), "pixel_std": (r, g, b)} of a checkpoint's detector: ModelConfig
    overrides, so a run that starts from it normalizes its inputs as its backbone learned."""
    meta = _read(lambda: load_meta(checkpoints_folder(path)))
    record = meta.get("model", meta)  # format 2 holds them in the model config, 1 beside it
    return {key: tuple(record[key]) for key in ("pixel_mean", "pixel_std")}


def init_from_checkpoint(model: SSD, class_names, path) -> dict[str, str]:
    """Loads the checkpoint at `path` into `model` (in place; the rules are the module's) and
    logs what was carried over. Every check runs before anything is written.

    Returns {class name here: its name in the checkpoint} of the classes carried over.
    """
    loaded = _read(lambda: load_model(path))
    check_layout(loaded.config, model.config, path)
    check_pixel_stats(loaded.config, model.config, path)
    shared = shared_classes(loaded.class_names, class_names)
    trained = dict(nnx.to_flat_state(nnx.state(loaded.model, nnx.Param)))
    fresh = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    _check_same_arrays(trained, fresh, path, model.config.name)
    anchors = dict(zip(model.config.sources, model.config.priors.boxes_per_location))
    new = {key: (variable.replace(copy_class_logits(variable[...], trained[key][...], shared,
                                                    anchors[key[1]]))
                 if key[0] == "conf" else trained[key])
           for key, variable in fresh.items()}
    nnx.update(model, nnx.from_flat_state(new))
    carried = {class_names[t - 1]: loaded.class_names[s - 1] for t, s in shared.items() if t}
    _log_classes(path, loaded.step, class_names, carried)
    return carried


def _check_same_arrays(trained: dict, fresh: dict, path, model_name: str) -> None:
    """Raises InitFromError naming the first array the two models do not have alike (the conf
    heads may differ in their number of classes only)."""
    for key in sorted(trained.keys() | fresh.keys()):
        name = "/".join(map(str, key))
        if key not in trained or key not in fresh:
            where = "this run's model" if key not in fresh else path
            raise InitFromError(f"{name} is missing from {where}: {path} holds another network "
                                f"than this run's {model_name}")
        there, here = trained[key].shape, fresh[key].shape
        if (there[:-1] if key[0] == "conf" else there) != (here[:-1] if key[0] == "conf" else here):
            raise InitFromError(f"{name} has shape {there} in {path} but {here} in this run's "
                                f"{model_name}: the checkpoint holds another network")


def _log_classes(path, step: int, class_names, carried: dict[str, str]) -> None:
    kept = [name if name == carried[name] else f"{name} (from {carried[name]})" for name in carried]
    fresh = [name for name in class_names if name not in carried]
    tqdm.write(f"init from {path} (step {step}): backbone, extras and box heads loaded; classes "
               f"carried over: {', '.join(kept) or 'none'}; start fresh: "
               f"{', '.join(fresh) or 'none'}")


def _read(load):
    """`load()`, with a missing or unreadable checkpoint as an InitFromError."""
    try:
        return load()
    except (FileNotFoundError, ValueError) as error:
        raise InitFromError(str(error)) from error


def freeze_backbone(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` for every parameter outside the backbone; the backbone's get zero updates (so no
    weight decay either, and no optimizer state)."""
    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if path[0].key == "backbone" else "trained", params)

    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
