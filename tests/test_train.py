import dataclasses
import json
import warnings

import jax
import numpy as np
import pytest

from experiments import train_voc
from ssd_jax import train as train_lib
from ssd_jax.checkpoint import load_model
from ssd_jax.data import pipeline
from ssd_jax.data.shapes import CLASS_NAMES, ShapesDataset
from ssd_jax.sharding import data_mesh, replicated, shard_batch

TINY = train_lib.TrainConfig(
    dataset="shapes", model="ssd_mini", image_size=64, batch_size=8, max_boxes=4,
    num_steps=6, learning_rate=1e-2, warmup_steps=2, decay_steps=(4,), log_every=1,
    checkpoint_every=2, eval_examples=8)


def tiny_sources():
    return (ShapesDataset("train", num_examples=64, image_size=64, max_objects=3),
            ShapesDataset("validation", num_examples=8, image_size=64, max_objects=3))


def test_learning_rate_warms_up_linearly_then_decays_at_each_step():
    config = dataclasses.replace(TINY, learning_rate=0.1, warmup_steps=10, decay_steps=(20, 30))
    schedule = train_lib.learning_rate_schedule(config)
    np.testing.assert_allclose([schedule(s) for s in (0, 5, 10, 19, 20, 29, 30, 40)],
                               [0, 0.05, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


PARAMS = {"conv": {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)},
          "l2norm": {"scale": np.ones(3, np.float32)}}


def _first_update(caffe_param_groups, gradient):
    config = dataclasses.replace(TINY, learning_rate=1.0, warmup_steps=0, momentum=0.0,
                                 weight_decay=0.5, optimizer="sgd",
                                 caffe_param_groups=caffe_param_groups)
    tx = train_lib.make_optimizer(config)
    grads = jax.tree.map(lambda p: np.full_like(p, gradient), PARAMS)
    return tx.update(grads, tx.init(PARAMS), PARAMS)[0]


def test_weight_decay_applies_to_kernels_only():
    updates = _first_update(False, 0.0)
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.5)
    np.testing.assert_allclose(updates["conv"]["bias"], 0.0)
    np.testing.assert_allclose(updates["l2norm"]["scale"], 0.0)


def test_caffe_param_groups_decay_all_but_biases_and_double_the_bias_rate():
    decay = _first_update(True, 0.0)
    np.testing.assert_allclose(decay["conv"]["kernel"], -0.5)
    np.testing.assert_allclose(decay["l2norm"]["scale"], -0.5)
    np.testing.assert_allclose(decay["conv"]["bias"], 0.0)
    step = _first_update(True, 1.0)  # gradient 1 plus decay 0.5, biases without decay, x2
    np.testing.assert_allclose(step["conv"]["kernel"], -1.5)
    np.testing.assert_allclose(step["conv"]["bias"], -2.0)


def _run_steps(config, devices, num_steps):
    """Losses and final params of `num_steps` steps on `devices`, checking that every step
    returns its state and metrics replicated, as the step states, and takes over the old
    state's buffers (donation that fails only warns, "Some donated buffers were not usable")."""
    mesh = data_mesh(devices)
    _, state, step_fn = train_lib.init_training(config, len(CLASS_NAMES), mesh)
    loader = pipeline.make_train_loader(tiny_sources()[0], batch_size=config.batch_size,
                                        max_boxes=config.max_boxes, image_size=64, seed=0)
    losses = []
    for _ in range(num_steps):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            new_state, metrics = step_fn(state, shard_batch(next(loader), mesh))
        assert all(leaf.sharding == replicated(mesh)
                   for leaf in jax.tree.leaves((new_state, metrics)))
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))
        state = new_state
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


def test_eight_devices_train_like_one():
    assert jax.device_count() == 8, "conftest sets 8 host devices"
    losses_1, params_1 = _run_steps(TINY, jax.devices()[:1], 3)
    losses_8, params_8 = _run_steps(TINY, jax.devices(), 3)
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                 params_8, params_1)


def test_batch_size_not_divisible_by_devices_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by the number of devices"):
        train_lib.train(dataclasses.replace(TINY, batch_size=6), *tiny_sources(), CLASS_NAMES)


def _losses(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [r["map"] for r in records if "map" in r]


def test_interrupted_run_resumes_with_the_same_losses(tmp_path, monkeypatch):
    full = dataclasses.replace(TINY, workdir=str(tmp_path / "full"))
    train_lib.train(full, *tiny_sources(), CLASS_NAMES)

    resumed = dataclasses.replace(TINY, workdir=str(tmp_path / "resumed"))
    real_loader = pipeline.make_train_loader

    class CrashingLoader:
        """Dies while fetching batch 6, after checkpoint 4 was written."""

        def __init__(self, *args, **kwargs):
            self.batches = real_loader(*args, **kwargs)
            self.served = 0

        def __next__(self):
            if self.served == 5:
                raise KeyboardInterrupt
            self.served += 1
            return next(self.batches)

        def close(self):
            self.batches.close()

    monkeypatch.setattr(pipeline, "make_train_loader", CrashingLoader)
    with pytest.raises(KeyboardInterrupt):
        train_lib.train(resumed, *tiny_sources(), CLASS_NAMES)
    monkeypatch.setattr(pipeline, "make_train_loader", real_loader)
    assert len(_losses(tmp_path / "resumed")[0]) == 5
    train_lib.train(resumed, *tiny_sources(), CLASS_NAMES)

    full_losses, full_map = _losses(tmp_path / "full")
    resumed_losses, resumed_map = _losses(tmp_path / "resumed")
    assert len(full_losses) == TINY.num_steps
    np.testing.assert_allclose(resumed_losses, full_losses, rtol=1e-6)
    np.testing.assert_allclose(resumed_map, full_map, rtol=1e-6)
    assert (tmp_path / "resumed" / "loss_curve.png").stat().st_size > 0


def test_non_finite_loss_stops_training_loudly(tmp_path):
    config = dataclasses.replace(TINY, learning_rate=1e12, warmup_steps=0, num_steps=8,
                                 workdir=str(tmp_path))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train_lib.train(config, *tiny_sources(), CLASS_NAMES)


def test_saved_model_reloads_with_its_class_names_and_the_step_compiled_once(tmp_path, caplog):
    config = dataclasses.replace(TINY, num_steps=2, workdir=str(tmp_path))
    with jax.log_compiles(), caplog.at_level("WARNING"):
        train_lib.train(config, *tiny_sources(), CLASS_NAMES)
    # compiled ahead for pipeline.empty_train_batch, and the real batches hit that compilation
    assert caplog.text.count("Finished XLA compilation of jit(train_step)") == 1
    loaded = load_model(tmp_path)
    model = loaded.model
    assert loaded.class_names == CLASS_NAMES and loaded.meta["train"]["num_steps"] == 2
    assert model.config.priors.image_size == 64
    loc, conf = model(np.zeros((1, 64, 64, 3), np.uint8))
    assert conf.shape == (1, model.config.priors.num_priors, len(CLASS_NAMES) + 1)


def test_every_config_field_is_a_flag_overriding_the_preset():
    config = train_voc.parse_config(["--dataset", "shapes", "--batch-size", "4",
                                     "--decay-steps", "10", "20", "--learning-rate", "0.5"])
    assert config.model == "ssd_mini" and config.batch_size == 4
    assert config.decay_steps == (10, 20) and config.learning_rate == 0.5
    assert train_voc.parse_config([]).model == "ssd300"
    assert train_voc.parse_config([]).matching == "bipartite"
    caffe = train_voc.parse_config(["--matching", "argmax", "--keep-difficult",
                                    "--caffe-param-groups"])
    assert caffe.matching == "argmax" and caffe.keep_difficult and caffe.caffe_param_groups


def test_only_the_small_shapes_model_splits_a_cpu_into_one_device_per_core():
    assert train_voc.parse_config(["--dataset", "shapes"]).cpu_device_per_core
    assert not train_voc.parse_config(["--dataset", "shapes",
                                       "--no-cpu-device-per-core"]).cpu_device_per_core
    assert not train_voc.parse_config([]).cpu_device_per_core  # SSD300: slower split
    assert not train_voc.parse_config(["--dataset", "coco"]).cpu_device_per_core


def test_unknown_matching_rule_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        train_voc.parse_config(["--matching", "hungarian"])
    assert "invalid choice: 'hungarian'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="matching"):
        dataclasses.replace(TINY, matching="hungarian")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from experiments import eval_voc
    with pytest.raises(SystemExit, match="does not exist"):
        eval_voc.main(["--checkpoint", str(tmp_path / "nope"), "--dataset", "shapes"])


def test_image_size_of_a_fixed_size_model_is_a_clear_error():
    with pytest.raises(ValueError, match="ssd_mini only"):  # when the config is built
        dataclasses.replace(TINY, model="ssd300", image_size=64)
