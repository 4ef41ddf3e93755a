"""Checkpoints with orbax: the weights (a training run's whole train state) plus a JSON
record of everything that defines the detector (`checkpoint_meta`), so that a checkpoint
alone rebuilds it (`load_model`). Loading needs nothing of the training stack.

A checkpoint directory holds orbax step folders <step>/state (arrays) and <step>/meta (JSON).

A step folder that cannot be read back (a file deleted or cut short) or that holds
non-finite numbers is damaged. Loading the latest checkpoint skips damaged steps for the
newest intact one and says so (`load_newest_intact`); loading a given step raises one
`DamagedCheckpointError` naming it.
"""
import contextlib
import dataclasses
import gc
import json
import logging
import shutil
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from reference.priors import PriorConfig
from ssd_jax.inference import InferenceConfig
from ssd_jax.model import SSD, Conv, MaxPool, ModelConfig, get_config


class DamagedCheckpointError(ValueError):
    """A checkpoint step that cannot be used; the message names the step and why."""

    def __init__(self, directory, step: int, reason: str):
        super().__init__(f"checkpoint step {step} in {directory} is damaged: {reason}")
        self.step, self.reason = step, reason


class DamagedCheckpointWarning(UserWarning):
    """A damaged newer checkpoint step was skipped for an older intact one."""


def checkpoint_manager(directory, *, max_to_keep: int = 3, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                           read_only=read_only)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                 item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore(manager: ocp.CheckpointManager, target_state, step: int | None = None):
    """Restores (state, meta) at `step` (default: latest) into the structure,
    shapes and shardings of `target_state` (concrete or abstract arrays).
    Raises DamagedCheckpointError if the step cannot be read or holds non-finite values."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    with reading(manager.directory, step):
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    check_finite(restored["state"], manager.directory, step)
    return restored["state"], restored["meta"]


def load_meta(directory, step: int | None = None) -> dict:
    """The JSON record of a checkpoint directory, with a clear error if there is none."""
    step = checkpoint_steps(directory)[0] if step is None else step
    manager = checkpoint_manager(directory, read_only=True)
    with reading(directory, step):
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def checkpoint_steps(directory) -> list[int]:
    """The saved steps of a checkpoint directory, newest first (FileNotFoundError if none)."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    steps = sorted(checkpoint_manager(directory, read_only=True).all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{directory} holds no checkpoint (expected orbax step folders)")
    return steps


@contextlib.contextmanager
def reading(directory, step: int):
    """Turns the errors of reading a torn or partly deleted step (orbax's and TensorStore's
    OSError, ValueError, KeyError, JSON errors) into one DamagedCheckpointError naming it."""
    try:
        yield
    except (OSError, ValueError, KeyError) as error:
        _discard_failed_reads()
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DamagedCheckpointError(directory, step, reason[:300]) from None


def _discard_failed_reads() -> None:
    """Collects the array reads a failed restore abandoned, quietly: each would otherwise
    print its own TensorStore traceback when collected ("Exception ignored in <coroutine ...>",
    asyncio's "Task exception was never retrieved")."""
    hook, sys.unraisablehook = sys.unraisablehook, lambda _: None
    asyncio_log = logging.getLogger("asyncio")
    level = asyncio_log.level
    asyncio_log.setLevel(logging.CRITICAL)
    try:
        gc.collect()
    finally:
        sys.unraisablehook = _without_closed_loop_callbacks(hook)
        asyncio_log.setLevel(level)


def _without_closed_loop_callbacks(hook):
    """`hook` (an unraisable-exception hook) ignoring the "Event loop is closed" errors of
    TensorStore reads that a failed restore abandoned: they finish later, on their own
    threads, and call back into orbax's closed event loop. Everything else goes to `hook`."""
    if getattr(hook, "ignores_closed_loop_callbacks", False):
        return hook

    def filtered(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            hook(unraisable)

    filtered.ignores_closed_loop_callbacks = True
    return filtered


def check_finite(tree, directory, step: int) -> None:
    """Raises DamagedCheckpointError if an array of `tree` holds NaN or infinity."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)  # the train state is replicated: any copy will do
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.inexact) and not np.all(np.isfinite(leaf)):
            raise DamagedCheckpointError(
                directory, step, f"{jax.tree_util.keystr(path)} holds non-finite values "
                "(saved by a diverged run)")


def load_newest_intact(directory, load_step, step: int | None = None):
    """`load_step(step)` of the given step, or (step None) of the newest step it loads
    without DamagedCheckpointError; each damaged newer step is reported by a
    DamagedCheckpointWarning. Raises the given step's error, or one naming every damaged step
    when no step is intact."""
    if step is not None:
        return load_step(step)
    errors = []
    for candidate in checkpoint_steps(directory):
        try:
            result = load_step(candidate)
        except DamagedCheckpointError as error:
            errors.append(error)
            continue
        for error in errors:
            warnings.warn(f"{error}; using step {candidate}, the newest intact one",
                          DamagedCheckpointWarning, stacklevel=2)
        return result
    raise DamagedCheckpointError(directory, errors[-1].step, "; ".join(
        f"step {error.step}: {error.reason}" for error in errors) + " (no intact step left)")


def set_aside(directory, step: int) -> Path:
    """Moves a damaged step folder out of the checkpoint directory, to
    <directory>_damaged/<step>, so a resumed run can save that step again. Returns the new path."""
    directory = Path(directory)
    target = directory.with_name(directory.name + "_damaged") / str(step)
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(directory / str(step), target)
    return target


# --- What a checkpoint records, and rebuilding its model from that record alone. ---

# Version 2 records the whole ModelConfig, the label space and the inference settings.
# Version 1 (no "format_version"): the training config plus pixel statistics.
META_FORMAT_VERSION = 2
LAYER_TYPES = {"conv": Conv, "max_pool": MaxPool}


def model_config_to_dict(config: ModelConfig) -> dict:
    """A ModelConfig as JSON-ready values; `model_config_from_dict` gives it back."""
    def layer(value):
        kind = next(name for name, cls in LAYER_TYPES.items() if isinstance(value, cls))
        return {"type": kind, **dataclasses.asdict(value)}

    fields = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    fields.update(priors=dataclasses.asdict(config.priors),
                  backbone=[layer(value) for value in config.backbone],
                  extras=[layer(value) for value in config.extras])
    return json.loads(json.dumps(fields))  # tuples -> lists, as stored


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def model_config_from_dict(fields: dict) -> ModelConfig:
    """The ModelConfig of `model_config_to_dict`'s record (ValueError if it is not one)."""
    def layer(record):
        record = dict(record)
        kind = record.pop("type", None)
        if kind not in LAYER_TYPES:
            raise ValueError(f"unknown layer type {kind!r} (known: {sorted(LAYER_TYPES)})")
        return LAYER_TYPES[kind](**record)

    fields = {key: _tuples(value) for key, value in fields.items()}
    fields.update(priors=PriorConfig(**{k: _tuples(v) for k, v in fields["priors"].items()}),
                  backbone=tuple(layer(r) for r in fields["backbone"]),
                  extras=tuple(layer(r) for r in fields["extras"]))
    return ModelConfig(**fields)


def checkpoint_meta(model_config: ModelConfig, class_names, *, label_ids=None,
                    inference: InferenceConfig = InferenceConfig(), train: dict | None = None,
                    source: dict | None = None) -> dict:
    """The JSON record saved beside a checkpoint's weights: everything that defines the
    detector, so that it is rebuilt from the checkpoint alone, never from code defaults.

    Args:
      model_config: the network, default boxes and pixel statistics.
      class_names: C names, of classes 1..C.
      label_ids: C ints, the label each class has in the checkpoint's own label space (e.g. a
        torchvision COCO model's category ids); default 1..C.
      inference: how the detector turns outputs into detections.
      train: the training config (`dataclasses.asdict(TrainConfig)`) of a training run.
      source: where converted weights came from, e.g. {"format": "torchvision", "file": ...}.
    """
    class_names = [str(name) for name in class_names]
    if len(class_names) != model_config.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model of "
                         f"{model_config.num_classes} classes")
    label_ids = list(range(1, len(class_names) + 1)) if label_ids is None else list(label_ids)
    if len(label_ids) != len(class_names) or len(set(label_ids)) != len(label_ids):
        raise ValueError(f"label_ids must be {len(class_names)} distinct ints, got {label_ids}")
    meta = dict(format_version=META_FORMAT_VERSION, model=model_config_to_dict(model_config),
                class_names=class_names, label_ids=[int(i) for i in label_ids],
                inference=dataclasses.asdict(inference))
    if train is not None:
        meta["train"] = json.loads(json.dumps(train))
    if source is not None:
        meta["source"] = source
    return meta


def _model_config_of_v1(meta: dict) -> ModelConfig:
    """Version 1 records only the training config: the model is that of its preset (the only
    place its geometry can come from), with the stored pixel statistics."""
    train = meta["train"]
    overrides = dict(num_classes=len(meta["class_names"]), dtype=train.get("dtype", "float32"),
                     pixel_mean=tuple(meta["pixel_mean"]), pixel_std=tuple(meta["pixel_std"]))
    if train.get("image_size"):
        overrides["image_size"] = train["image_size"]
    return get_config(train["model"], **overrides)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A checkpoint's detector, rebuilt from its record (see `load_model`).

    Attributes:
      model: the `ssd_jax.model.SSD` with the stored weights.
      config: its ModelConfig, as stored.
      class_names: C names, of classes 1..C.
      label_ids: C ints, each class's label in the checkpoint's own label space.
      inference: the stored inference settings.
      meta: the whole JSON record (e.g. meta["train"] for a training run).
      step: the step loaded.
    """

    model: SSD
    config: ModelConfig
    class_names: tuple[str, ...]
    label_ids: tuple[int, ...]
    inference: InferenceConfig
    meta: dict
    step: int


def checkpoints_folder(directory) -> Path:
    """A run's checkpoints/ folder for a run folder, else `directory` itself; absolute (orbax
    reads no array metadata through a relative path)."""
    directory = Path(directory).absolute()
    return directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory


def load_model(directory, step: int | None = None) -> LoadedModel:
    """Rebuilds the detector of a checkpoint directory: a training run's folder (or its
    checkpoints/ folder) or the output of `experiments.convert_ssd`.

    The model is built from the stored ModelConfig (version 1 records: from the stored training
    preset) and only its weights are read (not a training run's optimizer state). `step`
    defaults to the newest intact step (damaged newer steps are skipped with a
    DamagedCheckpointWarning). Raises FileNotFoundError if there is no checkpoint,
    DamagedCheckpointError if the step (or every step) is damaged, ValueError if the record is
    not one this version understands or its geometry does not fit the stored weights (naming
    the first array that differs).
    """
    directory = checkpoints_folder(directory)
    return load_newest_intact(directory, lambda step: _load_model_step(directory, step), step)


def _load_model_step(directory: Path, step: int) -> LoadedModel:
    meta = load_meta(directory, step)
    try:
        if "format_version" not in meta:
            config, label_ids, settings = _model_config_of_v1(meta), None, InferenceConfig()
        elif meta["format_version"] == META_FORMAT_VERSION:
            config = model_config_from_dict(meta["model"])
            label_ids, settings = meta["label_ids"], InferenceConfig.from_dict(meta["inference"])
        else:
            raise ValueError(f"{directory} is not a checkpoint this version of ssd_jax can "
                             f"load (record format {meta['format_version']}; this version "
                             f"reads up to {META_FORMAT_VERSION})")
        class_names = meta["class_names"]
        # Normalizes and checks the label space against the class names.
        label_ids = checkpoint_meta(config, class_names, label_ids=label_ids)["label_ids"]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{directory} is not a checkpoint this version of ssd_jax can load "
                         f"({type(error).__name__}: {error})") from error
    abstract = nnx.eval_shape(lambda: SSD(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    state_path = directory / str(step) / "state"
    with reading(directory, step):
        stored = ocp.PyTreeCheckpointer().metadata(state_path).item_metadata
    if stored is None:  # orbax logs why and returns nothing
        _discard_failed_reads()
        raise DamagedCheckpointError(directory, step, f"the array metadata in {state_path} "
                                     "cannot be read")
    stored = stored.tree
    _check_stored_shapes(state_path, stored, {"params": params, "rest": rest})
    target = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, params),
              "rest": jax.tree.map(ocp.utils.to_shape_dtype_struct, rest)}
    with reading(directory, step):
        restored = ocp.PyTreeCheckpointer().restore(state_path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))
    check_finite(restored, directory, step)
    model = nnx.merge(graphdef, restored["params"], restored["rest"])
    return LoadedModel(model=model, config=config, class_names=tuple(class_names),
                       label_ids=tuple(label_ids), inference=settings, meta=meta, step=step)


def _leaf_shapes(tree, prefix: tuple = ()) -> dict[str, tuple]:
    """{"loc/conv4_3/kernel": shape} of a nested mapping of arrays (orbax metadata or an
    nnx.State; a Variable's "value" level is not part of the name)."""
    if hasattr(tree, "shape"):
        return {"/".join(prefix): tuple(tree.shape)}
    shapes = {}
    for key, value in tree.items():
        shapes.update(_leaf_shapes(value, prefix if key == "value" else prefix + (str(key),)))
    return shapes


def _check_stored_shapes(state_path: Path, stored, expected: dict) -> None:
    """Raises ValueError naming the first array whose stored shape (`stored`: the step's orbax
    metadata tree) the model lacks or differs."""
    stored = _leaf_shapes({key: stored[key] for key in expected if key in stored})
    for name, shape in _leaf_shapes(expected).items():
        if stored.get(name) != shape:
            found = "is missing" if name not in stored else f"has shape {stored[name]}"
            raise ValueError(
                f"{state_path.parent}: the stored model config does not fit the stored "
                f"weights: {name} {found}, the config's geometry gives {shape} (was the "
                "record edited, or written for other weights?)")


def save_model(directory, model: SSD, class_names, *, step: int = 0, **meta_fields) -> Path:
    """Writes `model`'s weights and record as a checkpoint directory `load_model` reads (no
    optimizer state); `meta_fields` are `checkpoint_meta`'s keyword arguments."""
    meta = checkpoint_meta(model.config, class_names, **meta_fields)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    manager = checkpoint_manager(directory)
    save(manager, step, {"params": params, "rest": rest}, meta)
    manager.wait_until_finished()
    manager.close()
    return Path(directory)
