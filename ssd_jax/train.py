"""Training: one jitted, data-parallel train step and the loop around it.

The step is a pure function `train_step(state, batch) -> (state, metrics)`, jitted
once with the state donated. Ground truth arrives padded to G slots with a mask
and is matched and encoded inside the step, so nothing goes back to the host.
"""
import dataclasses
import json
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
from ssd_jax import inference
from ssd_jax.checkpoint import checkpoint_manager, checkpoint_meta, restore, save
from ssd_jax.convert import backbone_pixel_stats, load_backbone_weights
from ssd_jax.data import pipeline
from ssd_jax.data.augment import ssd_train_transform
from ssd_jax.evaluation import evaluate_source
from ssd_jax.loss import multibox_loss
from ssd_jax.matching import build_targets
from ssd_jax.model import SSD, ModelConfig, get_config
from ssd_jax.plots import plot_loss_curve
from ssd_jax.sharding import (check_batch_size, data_mesh, maybe_initialize_distributed,
                              replicate, shard_batch)


OPTIMIZERS = {
    "sgd": lambda schedule, config: optax.sgd(schedule, momentum=config.momentum),
    "adam": lambda schedule, config: optax.adam(schedule),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; every field is a command-line flag."""

    dataset: str = "voc"
    data_dir: str = ""
    model: str = "ssd300"
    backbone_weights: str = ""  # ImageNet VGG16 from experiments.convert_vgg16
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
    train_examples: int = 0
    eval_examples: int = 0

    def __post_init__(self):
        if self.batch_size < 1 or self.num_steps < 1:
            raise ValueError("batch_size and num_steps must be >= 1")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.matching not in RULES:
            raise ValueError(f"matching must be one of {RULES}, got {self.matching!r}")
        if list(self.decay_steps) != sorted(self.decay_steps):
            raise ValueError(f"decay_steps must be increasing, got {self.decay_steps}")


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
    return optax.chain(*parts)


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


def make_train_step(graphdef, tx, priors, config: TrainConfig):
    """Returns the jitted `train_step(state, batch) -> (state, metrics)`.

    batch: dict with "image" uint8 [B, S, S, 3], "boxes" [B, G, 4] corners,
    "labels" [B, G] int, "mask" [B, G] bool.
    """
    priors = jnp.asarray(priors)

    def loss_fn(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        loc, conf_logits = model(batch["image"])
        loc_target, labels = build_targets(
            batch["boxes"], batch["labels"], batch["mask"], priors,
            iou_threshold=config.match_iou_threshold, rule=config.matching)
        terms = multibox_loss(loc, conf_logits, loc_target, labels,
                              neg_pos_ratio=config.neg_pos_ratio)
        return terms["loss"], terms

    def train_step(state: TrainState, batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, terms), grads = grad_fn(state.params, state.rest, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(terms, grad_norm=optax.tree.norm(grads),
                       learning_rate=learning_rate_schedule(config)(state.step))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(train_step, donate_argnums=0)


def model_config(config: TrainConfig, num_classes: int, **overrides) -> ModelConfig:
    """The ModelConfig a training run builds; `overrides` replace its fields."""
    if config.image_size:
        if config.model != "ssd_mini":
            raise ValueError(f"--image-size applies to ssd_mini only; {config.model} has the "
                             "fixed input size of its default boxes")
        overrides.setdefault("image_size", config.image_size)
    if config.backbone_weights and "pixel_mean" not in overrides:
        overrides.update(backbone_pixel_stats(config.backbone_weights))
    return get_config(config.model, num_classes=num_classes, dtype=config.dtype, **overrides)


def build_model(config: TrainConfig, num_classes: int, **overrides) -> SSD:
    return SSD(model_config(config, num_classes, **overrides), rngs=nnx.Rngs(config.seed))


class MetricsLog:
    """metrics.jsonl: one JSON object per line; a resumed run first drops the
    records past its checkpoint so the file reads like one uninterrupted run."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        old = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        self.records = [r for r in old if r["step"] <= start_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _mean_metrics(pending: list[dict]) -> dict:
    host = jax.device_get(pending)
    return {key: float(np.mean([m[key] for m in host])) for key in host[0]}


def init_training(config: TrainConfig, num_classes: int, mesh):
    """The model's graph, its train state replicated over `mesh`, and the jitted step."""
    model = build_model(config, num_classes)
    if config.backbone_weights:
        load_backbone_weights(model, config.backbone_weights)
    tx = make_optimizer(config)
    graphdef, state = create_train_state(model, tx)
    step_fn = make_train_step(graphdef, tx, prior_boxes(model.config.priors), config)
    return graphdef, replicate(state, mesh), step_fn


def train(config: TrainConfig, train_source, eval_source, class_names, *, devices=None) -> dict:
    """Trains from scratch or resumes from the latest checkpoint in `workdir`.

    `devices` defaults to every device. Writes `workdir`/checkpoints (orbax),
    metrics.jsonl, loss_curve.png and, after the final evaluation, eval.json.
    Returns the final evaluation result.
    """
    maybe_initialize_distributed()
    mesh = data_mesh(devices)
    local_batch_size = check_batch_size(config.batch_size, mesh)
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run_model_config = model_config(config, len(class_names))
    image_size = run_model_config.priors.image_size

    graphdef, state, train_step = init_training(config, len(class_names), mesh)
    manager = checkpoint_manager(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
    meta = checkpoint_meta(run_model_config, class_names, train=dataclasses.asdict(config))
    if manager.latest_step() is not None:
        state, _ = restore(manager, state)
    start_step = int(state.step)
    transform = (ssd_train_transform(image_size, mean=run_model_config.pixel_mean)
                 if config.augment else None)
    loader = pipeline.make_train_loader(
        train_source, batch_size=local_batch_size, max_boxes=config.max_boxes,
        image_size=image_size, seed=config.seed, transform=transform,
        worker_count=config.num_workers, start_step=start_step,
        shard=(jax.process_index(), jax.process_count()), keep_difficult=config.keep_difficult)
    predict = inference.make_predict_fn(graphdef, run_model_config)
    log = MetricsLog(workdir / "metrics.jsonl", start_step)

    def run_eval(step):
        result = evaluate_source(predict, state.params, state.rest, eval_source,
                                 batch_size=config.batch_size, max_boxes=config.max_boxes,
                                 image_size=image_size, num_classes=len(class_names))
        log.write({"step": step, "map": result["map"]})
        return result

    bar = tqdm(range(start_step, config.num_steps), initial=start_step, total=config.num_steps,
               desc="train", unit="step")
    pending, last_time = [], time.perf_counter()
    try:
        for step in bar:
            state, metrics = train_step(state, shard_batch(next(loader), mesh))
            pending.append(metrics)
            done = step + 1
            if done % config.log_every == 0 or done == config.num_steps:
                now = time.perf_counter()
                record = dict(step=done, **_mean_metrics(pending),
                              images_per_s=len(pending) * config.batch_size / (now - last_time))
                if not np.isfinite(record["loss"]):
                    raise FloatingPointError(f"non-finite loss {record['loss']} at step {done}: "
                                             "lower --learning-rate or set --grad-clip-norm")
                pending, last_time = [], now
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}",
                                img_s=f"{record['images_per_s']:.1f}")
            if done % config.checkpoint_every == 0 or done == config.num_steps:
                save(manager, done, state, meta)
            if config.eval_every and done % config.eval_every == 0 and done != config.num_steps:
                run_eval(done)
    finally:
        manager.wait_until_finished()
        manager.close()
        loader.close()

    result = run_eval(config.num_steps)
    plot_loss_curve(log.records, workdir / "loss_curve.png")
    summary = {"map": result["map"], "ap": dict(zip(class_names, map(float, result["ap"])))}
    (workdir / "eval.json").write_text(json.dumps(summary, indent=2))
    return result
