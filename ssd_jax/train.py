"""Training: one jitted, data-parallel train step and the loop around it.

The step is a pure function `train_step(state, batch) -> (state, metrics)`, jitted
once with the state donated. Ground truth arrives padded to G slots with a mask
and is matched and encoded inside the step, so nothing goes back to the host.
"""
import dataclasses
import json
import os
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from reference.matching import RULES
from reference.priors import prior_boxes
from reference.validation import check_neg_pos_ratio
from ssd_jax import inference, platform
from ssd_jax.checkpoint import (checkpoint_manager, checkpoint_meta, checkpoint_steps, load_meta,
                                load_newest_intact, restore, save, set_aside)
from ssd_jax.convert import backbone_pixel_stats, load_backbone_weights
from ssd_jax.data import pipeline
from ssd_jax.data.augment import ssd_train_transform
from ssd_jax.data.sources import NATURAL_METRICS
from ssd_jax.evaluation import evaluate_source
from ssd_jax.finetune import checkpoint_pixel_stats, freeze_backbone, init_from_checkpoint
from ssd_jax.flags import (ConfigError, flag_name, require_choice, require_int,
                           require_number)
from ssd_jax.loss import multibox_loss
from ssd_jax.matching import build_targets
from ssd_jax.model import CONFIGS, DTYPES, SSD, ModelConfig, create_ssd, get_config
from ssd_jax.plots import plot_loss_curve
from ssd_jax.sharding import (batch_split, check_batch_size, data_mesh, is_main_process,
                              maybe_initialize_distributed, per_device, replicate, replicated,
                              shard_batch)


OPTIMIZERS = {
    "sgd": lambda schedule, config: optax.sgd(schedule, momentum=config.momentum),
    "adam": lambda schedule, config: optax.adam(schedule),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; every field is a command-line flag."""

    dataset: str = "voc"
    data_dir: str = ""
    # The splits of a COCO-format folder ("": train2017, val2017) or of a VOC-format folder
    # of your own ("": trainval, test).
    train_split: str = ""
    eval_split: str = ""
    classes: str = ""  # voc: your own class names, comma-separated ("": from the data)
    model: str = "ssd300"
    backbone_weights: str = ""  # ImageNet VGG16 from experiments.convert_vgg16
    # A trained detector's checkpoint to start from (ssd_jax.finetune); a workdir that holds a
    # checkpoint of this run resumes it instead.
    init_from: str = ""
    freeze_backbone: bool = False  # no updates to the backbone (fine-tuning on little data)
    image_size: int = 0  # 0: the model's own; ssd_mini accepts other sizes
    dtype: str = "float32"
    batch_size: int = 32
    max_boxes: int = 50
    augment: bool = True  # the paper's photometric, zoom-out, min-IoU crop and flip
    keep_difficult: bool = False  # train on VOC's difficult objects too, as Caffe does
    num_steps: int = 120_000
    optimizer: str = "sgd"  # "sgd" (the paper's, with momentum) or "adam"
    learning_rate: float = 1e-3
    warmup_steps: int = 1000
    decay_steps: tuple[int, ...] = (80_000, 100_000)
    decay_factor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Caffe's parameter groups: biases get twice the learning rate and no decay, everything
    # else (L2Norm's scale too) decay. Off: kernels decay, biases and the scale do not.
    caffe_param_groups: bool = False
    grad_clip_norm: float = 0.0
    neg_pos_ratio: int = 3
    match_iou_threshold: float = 0.5
    # Step 1 of matching: Caffe's greedy bipartite rule, or torchvision's argmax shortcut.
    matching: str = dataclasses.field(default="bipartite", metadata={"choices": RULES})
    seed: int = 0
    workdir: str = "runs/voc"
    log_every: int = 50
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    eval_every: int = 0
    num_workers: int = 0
    # On a CPU-only host, one XLA device per core with the batch split over them
    # (`platform.use_every_core`, applied by experiments.train_voc before JAX starts). It
    # pays for small models (ssd_mini, whose convolutions XLA runs on one core each), not
    # for SSD300, whose convolutions use every core anyway (BENCHMARKS.md).
    cpu_device_per_core: bool = False
    # How the model's convolutions run on a CPU: oneDNN's where it is installed, else XLA's
    # ("onednn": Winograd's for 3x3s; "onednn_direct"), or XLA's always ("xla");
    # ModelConfig.cpu_convolutions.
    cpu_convolutions: str = dataclasses.field(default="onednn",
                                              metadata={"choices": tuple(platform.CPU_CONVOLUTIONS)})
    train_examples: int = 0
    eval_examples: int = 0

    def __post_init__(self):
        """Rejects every field value a run cannot use (ConfigError, a ValueError naming it)."""
        for field in ("dataset", "model", "workdir"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ConfigError(field, f"must be a non-empty string, got {value!r}")
        require_choice(self, "model", CONFIGS)
        require_choice(self, "dtype", DTYPES)
        require_choice(self, "optimizer", OPTIMIZERS)
        require_choice(self, "matching", RULES)
        require_choice(self, "cpu_convolutions", platform.CPU_CONVOLUTIONS)
        for field in ("batch_size", "max_boxes", "num_steps", "log_every", "checkpoint_every",
                      "keep_checkpoints"):
            require_int(self, field, 1)
        for field in ("image_size", "warmup_steps", "eval_every", "num_workers",
                      "train_examples", "eval_examples", "seed"):
            require_int(self, field, 0)
        require_number(self, "learning_rate", 0, low_open=True)
        require_number(self, "decay_factor", 0, low_open=True)
        require_number(self, "momentum", 0, 1, high_open=True)
        require_number(self, "weight_decay", 0)
        require_number(self, "grad_clip_norm", 0)
        require_number(self, "match_iou_threshold", 0, 1)
        try:
            check_neg_pos_ratio(self.neg_pos_ratio)
        except ValueError as error:
            raise ConfigError("neg_pos_ratio", f"must be an integer >= 0, got "
                              f"{self.neg_pos_ratio!r}") from error
        if (not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                    for s in self.decay_steps)
                or list(self.decay_steps) != sorted(set(self.decay_steps))):
            raise ConfigError("decay_steps", f"must be increasing steps >= 1, got "
                              f"{self.decay_steps}")
        for field in ("augment", "freeze_backbone"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(field, f"must be True or False, got {getattr(self, field)!r}")
        if self.init_from and self.backbone_weights:
            raise ConfigError("init_from", "and --backbone-weights both load the backbone: give "
                              "one of them")
        if self.freeze_backbone and not (self.init_from or self.backbone_weights):
            raise ConfigError("freeze_backbone", "needs a trained backbone: give --init-from or "
                              "--backbone-weights")
        if self.image_size and self.model != "ssd_mini":
            raise ConfigError("image_size", f"applies to ssd_mini only; {self.model} has the "
                              "fixed input size of its default boxes (leave it 0)")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    rest: nnx.State  # the model's non-trainable variables, carried unchanged
    opt_state: optax.OptState


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then x`decay_factor` at each of `decay_steps`."""
    decay = optax.piecewise_constant_schedule(
        config.learning_rate,
        {step - config.warmup_steps: config.decay_factor for step in config.decay_steps})
    if config.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.join_schedules([warmup, decay], [config.warmup_steps])


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The paper's SGD: momentum 0.9, L2 weight decay 5e-4. Adam, for small models
    trained from scratch, gets the same L2 weight decay.

    By default the decay applies to the kernels only, not to the biases and the
    L2Norm scale.
    `caffe_param_groups` gives the Caffe release's groups instead (ssd_pascal.py:
    `param {lr_mult: 1 decay_mult: 1} param {lr_mult: 2 decay_mult: 0}` on every
    convolution, none on the Normalize layer): kernels and the L2Norm scale decay,
    biases do not and learn at twice the rate.
    """
    if config.caffe_param_groups:
        decay_mask = lambda params: _map_with_name(lambda name: name != "bias", params)  # noqa: E731
    else:
        decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    parts = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm > 0 else []
    parts += [optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
              OPTIMIZERS[config.optimizer](learning_rate_schedule(config), config)]
    if config.caffe_param_groups:
        bias_mask = lambda params: _map_with_name(lambda name: name == "bias", params)  # noqa: E731
        parts.append(optax.masked(optax.scale(2.0), bias_mask))
    tx = optax.chain(*parts)
    return freeze_backbone(tx) if config.freeze_backbone else tx


def _map_with_name(fn, params):
    """fn(the parameter's name: "kernel", "bias" or "scale") for every leaf of `params`."""
    def name(path):
        return next(key.key for key in reversed(path) if isinstance(key, jax.tree_util.DictKey))
    return jax.tree_util.tree_map_with_path(lambda path, _: fn(name(path)), params)


def create_train_state(model: SSD, tx: optax.GradientTransformation):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                       opt_state=tx.init(params))
    return graphdef, state


def make_train_step(graphdef, tx, priors, config: TrainConfig, mesh):
    """Returns the jitted `train_step(state, batch) -> (state, metrics)` on `mesh`.

    batch: dict with "image" uint8 [B, S, S, 3], "boxes" [B, G, 4] corners,
    "labels" [B, G] int, "mask" [B, G] bool, split along B over the mesh (`shard_batch`).
    The state is replicated, in and out, and donated: the shardings are stated, so the
    new state always has the old one's layout and takes over its buffers.
    """
    priors = jnp.asarray(priors)
    # Matching is per image: each device matches its own images, with no cross-device
    # step inside the matching loops. It needs no gradient, so it runs before the model.
    targets = per_device(lambda boxes, labels, mask: build_targets(
        boxes, labels, mask, priors, iou_threshold=config.match_iou_threshold,
        rule=config.matching), mesh)

    def loss_fn(params, rest, images, loc_target, labels):
        model = nnx.merge(graphdef, params, rest)
        loc, conf_logits = model(images)
        terms = multibox_loss(loc, conf_logits, loc_target, labels,
                              neg_pos_ratio=config.neg_pos_ratio)
        return terms["loss"], terms

    def train_step(state: TrainState, batch):
        loc_target, labels = targets(batch["boxes"], batch["labels"], batch["mask"])
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, terms), grads = grad_fn(state.params, state.rest, batch["image"], loc_target,
                                    labels)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        # A step that makes anything non-finite leaves the state as it was, so a diverging
        # run never holds (or saves) NaN; the loop stops at its next log or checkpoint step.
        finite = _all_finite((terms["loss"], grad_norm, new_state))
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        metrics = dict(terms, grad_norm=grad_norm, finite=finite,
                       learning_rate=learning_rate_schedule(config)(state.step))
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=0,
                   in_shardings=(replicated(mesh), batch_split(mesh)),
                   out_shardings=(replicated(mesh), replicated(mesh)),
                   compiler_options=platform.compiler_options(mesh.devices.flat))


def _all_finite(tree) -> jax.Array:
    """True if no float array of `tree` holds NaN or infinity (one reduction per array)."""
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)
                              if jnp.issubdtype(leaf.dtype, jnp.inexact)]))


def model_config(config: TrainConfig, num_classes: int, **overrides) -> ModelConfig:
    """The ModelConfig a training run builds; `overrides` replace its fields."""
    if config.image_size:
        overrides.setdefault("image_size", config.image_size)
    if config.backbone_weights and "pixel_mean" not in overrides:
        overrides.update(backbone_pixel_stats(config.backbone_weights))
    if config.init_from and "pixel_mean" not in overrides:
        overrides.update(checkpoint_pixel_stats(config.init_from))
    return get_config(config.model, num_classes=num_classes, dtype=config.dtype,
                      cpu_convolutions=config.cpu_convolutions, **overrides)


def build_model(config: TrainConfig, num_classes: int, **overrides) -> SSD:
    return create_ssd(model_config(config, num_classes, **overrides), config.seed)


class MetricsLog:
    """metrics.jsonl: one JSON object per line; a resumed run first drops the
    records past its checkpoint so the file reads like one uninterrupted run.

    That rewrite goes through a temporary file and a rename, so a kill leaves the old file or
    the new one, never an empty one. A torn last line (a kill mid-append) is dropped with a note.
    With `writes=False` (every process of a multi-host run but the main one) the records are
    only kept in memory.
    """

    def __init__(self, path: Path, start_step: int, *, writes: bool = True):
        self.path, self.writes = path, writes
        self.records = [r for r in read_metrics(path) if r["step"] <= start_step]
        if writes:
            temporary = path.with_name(path.name + ".tmp")
            temporary.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            os.replace(temporary, path)

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.writes:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl ([] if there is none); a torn last line is left out."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}, is not a JSON record: {line[:80]!r} "
                                 "(only the last line may be torn)") from None
            tqdm.write(f"note: dropped the torn last line of {path} ({line[:40]!r}...)")
    return records


def _mean_metrics(pending: list[dict]) -> dict:
    host = jax.device_get(pending)
    _check_finite_steps(host)
    return {key: float(np.mean([m[key] for m in host])) for key in host[0]
            if key not in ("step", "finite")}


def _check_finite_steps(host_metrics: list[dict]) -> None:
    """Raises FloatingPointError naming the first step whose update was not finite (and so was
    not applied: the state, and every checkpoint, holds only finite numbers)."""
    for m in host_metrics:
        if not m["finite"]:
            raise FloatingPointError(
                f"non-finite loss, gradient or parameters at step {m['step']} (loss {m['loss']}, "
                f"gradient norm {m['grad_norm']}): training stopped, the update was not applied "
                "and the checkpoints hold the last good state; lower --learning-rate or set "
                "--grad-clip-norm, then rerun to resume from the last checkpoint")


# What may change when a run resumes: how long it goes on, how its schedule continues (a lower
# learning rate after a divergence), how often it logs, saves and evaluates, where it reads.
# Anything else (the model, optimizer, batch size, data, ...) makes another run.
RESUMABLE_FIELDS = frozenset({
    "num_steps", "learning_rate", "warmup_steps", "decay_steps", "decay_factor", "workdir",
    "data_dir", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "num_workers",
    "eval_examples", "cpu_device_per_core", "cpu_convolutions"})


class RunMismatchError(ValueError):
    """The workdir holds a checkpoint of another run; the message names what differs."""


def check_same_run(meta: dict, config: TrainConfig, class_names, directory) -> None:
    """Raises RunMismatchError naming every field in which the run saved in `directory` (its
    checkpoint record `meta`) differs from `config` beyond RESUMABLE_FIELDS, or its classes;
    prints a note for each resumable field that changed."""
    if "train" not in meta:
        raise RunMismatchError(f"{directory} holds a checkpoint that is not an ssd_jax training "
                               "run's (no training config in its record): use another --workdir")
    saved = {key: tuple(v) if isinstance(v, list) else v for key, v in meta["train"].items()}
    current = dataclasses.asdict(config)
    changed = {key: (saved[key], current[key]) for key in saved.keys() & current.keys()
               if saved[key] != current[key]}
    differing = [f"{flag_name(key)} {old} there, {new} here"
                 for key, (old, new) in sorted(changed.items()) if key not in RESUMABLE_FIELDS]
    if list(meta.get("class_names", class_names)) != list(class_names):
        differing.append(f"classes {meta['class_names']} there, {list(class_names)} here")
    if differing:
        raise RunMismatchError(f"{directory} holds a different run ({'; '.join(differing)}): "
                               "use another --workdir, pass that run's values to resume it, or "
                               "delete the folder to start over")
    for key in sorted(changed.keys() & RESUMABLE_FIELDS - {"workdir"}):
        tqdm.write(f"note: resuming with {flag_name(key)} {changed[key][1]} "
                   f"(the run used {changed[key][0]})")


def resume(directory: Path, state: TrainState, config: TrainConfig, class_names) -> TrainState:
    """The newest intact checkpoint of the run in `directory`, restored into `state`'s
    structure and shardings. Damaged newer steps are reported and set aside (`set_aside`);
    a checkpoint of another run raises RunMismatchError (`check_same_run`)."""
    manager = checkpoint_manager(directory, read_only=True)

    def load_step(step):
        check_same_run(load_meta(directory, step), config, class_names, directory.parent)
        return restore(manager, state, step)[0]

    restored = load_newest_intact(directory, load_step)
    for step in checkpoint_steps(directory):
        if step > int(restored.step):
            moved_to = set_aside(directory, step)
            tqdm.write(f"note: moved damaged checkpoint step {step} to {moved_to}")
    return restored


def init_training(config: TrainConfig, num_classes: int, mesh, *, init_from_classes=None):
    """The model's graph, its train state replicated over `mesh`, and the jitted step.

    With `init_from_classes`, the run's class names, the weights start from the checkpoint
    `config.init_from` (`finetune.init_from_checkpoint`); a resumed run leaves it None.
    """
    model = build_model(config, num_classes)
    if config.backbone_weights:
        load_backbone_weights(model, config.backbone_weights)
    if config.init_from and init_from_classes is not None:
        init_from_checkpoint(model, init_from_classes, config.init_from)
    tx = make_optimizer(config)
    graphdef, state = create_train_state(model, tx)
    step_fn = make_train_step(graphdef, tx, prior_boxes(model.config.priors), config, mesh)
    return graphdef, replicate(state, mesh), step_fn


def train(config: TrainConfig, train_source, eval_source, class_names, *, devices=None) -> dict:
    """Trains from scratch (or from `init_from`) or resumes from the latest checkpoint in
    `workdir`.

    `devices` defaults to every device. Writes `workdir`/checkpoints (orbax),
    metrics.jsonl, loss_curve.png and, after the final evaluation, eval.json; in a multi-host
    run every process trains and evaluates, process 0 alone writes all but the checkpoints.
    Returns the final evaluation result.
    """
    maybe_initialize_distributed()
    mesh = data_mesh(devices)
    local_batch_size = check_batch_size(config.batch_size, mesh)
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run_model_config = model_config(config, len(class_names))
    image_size = run_model_config.priors.image_size

    # A checkpoint in the workdir wins over --init-from: the run resumes (a checkpoint of
    # another run, one with another --init-from too, is a RunMismatchError).
    resuming = (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir())
    graphdef, state, train_step = init_training(
        config, len(class_names), mesh, init_from_classes=None if resuming else class_names)
    if resuming:
        state = resume(workdir / "checkpoints", state, config, class_names)
    start_step = int(state.step)
    if start_step > config.num_steps:
        raise ConfigError("num_steps", f"{config.num_steps} is below step {start_step} of the "
                          f"checkpoint in {workdir}: raise it to train on, or use another "
                          "--workdir")
    manager = checkpoint_manager(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
    # A dataset's own label ids (COCO category ids) are what the checkpoint reports.
    meta = checkpoint_meta(run_model_config, class_names, train=dataclasses.asdict(config),
                           label_ids=getattr(train_source, "label_ids", None))
    transform = (ssd_train_transform(image_size, mean=run_model_config.pixel_mean)
                 if config.augment else None)
    loader = pipeline.make_train_loader(
        train_source, batch_size=local_batch_size, max_boxes=config.max_boxes,
        image_size=image_size, seed=config.seed, transform=transform,
        worker_count=config.num_workers, start_step=start_step,
        shard=(jax.process_index(), jax.process_count()), keep_difficult=config.keep_difficult)
    # Compiled before the first batch is read, so that compiling overlaps the input's start
    # (grain's workers, shapes drawn ahead); the loop's first call finds it in JAX's caches.
    train_step.lower(state, shard_batch(pipeline.empty_train_batch(
        batch_size=local_batch_size, max_boxes=config.max_boxes, image_size=image_size),
        mesh)).compile()
    predict = inference.make_predict_fn(graphdef, run_model_config, mesh=mesh)
    log = MetricsLog(workdir / "metrics.jsonl", start_step, writes=is_main_process())

    def run_eval(step):
        result = evaluate_source(predict, state.params, state.rest, eval_source,
                                 batch_size=config.batch_size, max_boxes=config.max_boxes,
                                 image_size=image_size, num_classes=len(class_names), mesh=mesh,
                                 metric=NATURAL_METRICS.get(config.dataset, "voc07"),
                                 class_names=class_names)
        if not any(r["step"] == step and "map" in r for r in log.records):  # a finished run's rerun
            log.write({"step": step, "map": result["map"], **result.get("coco", {})})
        return result

    bar = tqdm(range(start_step, config.num_steps), initial=start_step, total=config.num_steps,
               desc="train", unit="step", disable=not is_main_process())
    pending, last_time = [], time.perf_counter()
    unreadable = 0  # examples replaced by empty ones since this process started
    try:
        for step in bar:
            batch = next(loader)
            unreadable += int(batch.pop("unreadable").sum())  # host NumPy: no device sync
            state, metrics = train_step(state, shard_batch(batch, mesh))
            done = step + 1
            pending.append(dict(metrics, step=done))
            if done % config.log_every == 0 or done == config.num_steps:
                now = time.perf_counter()
                record = dict(step=done, **_mean_metrics(pending),
                              images_per_s=len(pending) * config.batch_size / (now - last_time),
                              unreadable_images=unreadable)
                pending, last_time = [], now
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}",
                                img_s=f"{record['images_per_s']:.1f}")
            if done % config.checkpoint_every == 0 or done == config.num_steps:
                _check_finite_steps(jax.device_get(pending))  # those since the last log step
                save(manager, done, state, meta)
            if config.eval_every and done % config.eval_every == 0 and done != config.num_steps:
                run_eval(done)
    finally:
        manager.wait_until_finished()
        manager.close()
        loader.close()

    result = run_eval(config.num_steps)
    if is_main_process():
        plot_loss_curve(log.records, workdir / "loss_curve.png")
        summary = {"map": result["map"], **result.get("coco", {}),
                   "ap": dict(zip(class_names, map(float, result["ap"])))}
        (workdir / "eval.json").write_text(json.dumps(summary, indent=2))
    return result
