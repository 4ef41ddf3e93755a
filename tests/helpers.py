"""Test helpers shared by test modules: a tiny checkpoint made without training."""
import dataclasses
import math

import jax
import numpy as np
from flax import nnx

from ssd_jax import train as train_lib
from ssd_jax.checkpoint import checkpoint_manager, checkpoint_meta, save
from ssd_jax.data.shapes import CLASS_NAMES
from ssd_jax.model import SSD
from tests.test_train import TINY


def random_model(config, num_classes: int = len(CLASS_NAMES)):
    """The model of the TrainConfig `config` with random weights (`random_ssd`)."""
    return random_ssd(train_lib.model_config(config, num_classes))


def random_ssd(model_config, seed: int = 0):
    """The SSD of `model_config` with He-normal kernels drawn by NumPy: jax.random's
    initializers take ~15 s to compile on a busy 2-core CPU, and the weights' values do not
    matter here."""
    abstract = nnx.eval_shape(lambda: SSD(model_config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if len(leaf.shape) < 2:
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = math.prod(leaf.shape[:-1])
        return rng.normal(0, math.sqrt(2 / fan_in), leaf.shape).astype(leaf.dtype)

    return nnx.merge(graphdef, jax.tree.map(draw, state))


def write_untrained_checkpoint(workdir, config=TINY, class_names=CLASS_NAMES, *,
                               old_format: bool = False, steps=(0,)):
    """Writes into `workdir` a checkpoint as `train` writes it (at each of `steps`, default
    step 0), of an untrained model of `config` (default: a 64 px ssd_mini) for `class_names`.
    Returns `workdir`.
    `old_format` writes the record of the first format (training config and pixel
    statistics only), as checkpoints written before the full model config was stored have."""
    config = dataclasses.replace(config, workdir=str(workdir))
    model = random_model(config, len(class_names))
    _, state = train_lib.create_train_state(model, train_lib.make_optimizer(config))
    if old_format:
        meta = dict(class_names=list(class_names), train=dataclasses.asdict(config),
                    pixel_mean=model.config.pixel_mean, pixel_std=model.config.pixel_std)
    else:
        meta = checkpoint_meta(model.config, class_names, train=dataclasses.asdict(config))
    manager = checkpoint_manager(workdir / "checkpoints")
    for step in steps:
        save(manager, step, state.replace(step=np.int32(step)), meta)
    manager.wait_until_finished()
    manager.close()
    return workdir
