"""Full-size SSD300 training on the CPU: minutes, so marked slow (`pytest -m slow`)."""
import jax
import numpy as np
import pytest

from ssd_jax import train as train_lib
from ssd_jax.data import pipeline
from ssd_jax.data.shapes import CLASS_NAMES, ShapesDataset
from ssd_jax.sharding import data_mesh, shard_batch


@pytest.mark.slow
def test_ssd300_loss_falls_on_shapes_over_30_steps():
    # From scratch (no ImageNet backbone here), so Adam, as the shapes preset; a few
    # images seen repeatedly, so 30 steps are enough to see the loss fall.
    config = train_lib.TrainConfig(dataset="shapes", model="ssd300", batch_size=4, max_boxes=8,
                                   augment=False, optimizer="adam", learning_rate=1e-4,
                                   warmup_steps=0, decay_steps=())
    mesh = data_mesh(jax.devices()[:1])
    _, state, train_step = train_lib.init_training(config, len(CLASS_NAMES), mesh)
    source = ShapesDataset("train", num_examples=8, image_size=300)
    loader = pipeline.make_train_loader(source, batch_size=4, max_boxes=8, image_size=300, seed=0)
    losses = []
    for _ in range(30):
        state, metrics = train_step(state, shard_batch(next(loader), mesh))
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
