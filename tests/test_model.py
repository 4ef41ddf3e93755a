"""Tests of ssd_jax.model: architecture sizes, output layout and dtypes.

SSD300/SSD512 are checked abstractly (nnx.eval_shape / jax.eval_shape: no
memory, no compute); real forward passes use the small ssd_mini.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reference.priors import cell_boxes, prior_boxes
from ssd_jax import platform
from ssd_jax.model import (CONFIGS, SSD, L2Norm, MaxPool, _tiled_max_pool, _weight_draw,
                           count_params, create_ssd, get_config, ssd300, ssd512, ssd_mini)


def abstract_model(config):
    return nnx.eval_shape(lambda: SSD(config, rngs=nnx.Rngs(0)))


def abstract_outputs(config, batch=2, dtype=jnp.uint8):
    graphdef, state = nnx.split(abstract_model(config))
    size = config.priors.image_size
    images = jax.ShapeDtypeStruct((batch, size, size, 3), dtype)
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, images)


def random_images(config, batch=2, seed=0):
    size = config.priors.image_size
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def mini_config():
    return ssd_mini(num_classes=3)


@pytest.fixture(scope="module")
def mini_model(mini_config):
    return SSD(mini_config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("seed", [0, 5])
def test_create_ssd_draws_the_same_weights_as_the_eager_constructor(mini_config, mini_model, seed):
    eager = mini_model if seed == 0 else SSD(mini_config, rngs=nnx.Rngs(seed))
    created = create_ssd(mini_config, seed)
    assert nnx.graphdef(created) == nnx.graphdef(eager)
    eager_state, created_state = nnx.to_pure_dict(nnx.state(eager)), nnx.to_pure_dict(
        nnx.state(created))
    assert jax.tree.structure(created_state) == jax.tree.structure(eager_state)
    for ours, theirs in zip(jax.tree.leaves(created_state), jax.tree.leaves(eager_state)):
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(ours, theirs)
    images = random_images(mini_config)
    np.testing.assert_array_equal(created(images)[1], eager(images)[1])


def test_create_ssd_compiles_once_per_config_and_seed_and_never_shares_buffers(mini_config):
    first = create_ssd(mini_config, 3)
    draw = _weight_draw(tuple(sorted(platform.run_once_compiler_options().items())))
    compiled = draw._cache_size()
    second = create_ssd(mini_config, 3)
    assert draw._cache_size() == compiled
    # A train step donates its state: two models must not hold the same buffers.
    for a, b in zip(jax.tree.leaves(nnx.state(first)), jax.tree.leaves(nnx.state(second))):
        assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("make_config, expected", [(ssd300, 26_285_486), (ssd512, 27_188_676)])
def test_parameter_count_matches_the_caffe_release(make_config, expected):
    assert count_params(abstract_model(make_config(num_classes=20))) == expected


@pytest.mark.parametrize("make_config, num_priors", [(ssd300, 8732), (ssd512, 24564)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_outputs_have_one_float32_row_per_prior(make_config, num_priors, dtype):
    config = make_config(num_classes=20, dtype=dtype)
    assert len(prior_boxes(config.priors)) == num_priors
    loc, conf = abstract_outputs(config, batch=2)
    assert (loc.shape, loc.dtype) == ((2, num_priors, 4), jnp.float32)
    assert (conf.shape, conf.dtype) == ((2, num_priors, 21), jnp.float32)


def test_source_maps_have_the_caffe_sizes_and_channels():
    assert ssd300().source_shapes() == [
        (38, 512), (19, 1024), (10, 512), (5, 256), (3, 256), (1, 256)]
    assert [size for size, _ in ssd512().source_shapes()] == [64, 32, 16, 8, 4, 2, 1]


def test_parameters_carry_the_vgg_and_caffe_layer_names():
    flat = nnx.to_flat_state(nnx.state(abstract_model(ssd300()), nnx.Param))
    shapes = {"/".join(map(str, path)): param.shape for path, param in flat}
    vgg = [f"conv{b}_{i}" for b, n in zip(range(1, 6), (2, 2, 3, 3, 3)) for i in range(1, n + 1)]
    for name in vgg + ["conv6", "conv7"]:
        assert f"backbone/{name}/kernel" in shapes and f"backbone/{name}/bias" in shapes
    for name in [f"conv{block}_{i}" for block in range(8, 12) for i in (1, 2)]:
        assert f"extras/{name}/kernel" in shapes
    assert shapes["backbone/conv1_1/kernel"] == (3, 3, 3, 64)  # HWIO
    assert shapes["backbone/conv6/kernel"] == (3, 3, 512, 1024)
    assert shapes["backbone/conv7/kernel"] == (1, 1, 1024, 1024)
    assert shapes["l2norm/scale"] == (512,)
    assert shapes["loc/conv4_3/kernel"] == (3, 3, 512, 4 * 4)
    assert shapes["conf/conv7/kernel"] == (3, 3, 1024, 6 * 21)


def test_initialization_is_xavier_uniform_with_zero_biases(mini_model):
    conv = mini_model.backbone["conv4_2"]
    fan_in, fan_out = 3 * 3 * conv.in_features, 3 * 3 * conv.out_features
    kernel = np.asarray(conv.kernel[...])
    bound = np.sqrt(6 / (fan_in + fan_out))
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
    assert np.isclose(kernel.std(), bound / np.sqrt(3), rtol=0.05)
    assert not np.any(np.asarray(conv.bias[...]))


def test_pool3_ceil_mode_rounds_up_and_keeps_the_border_cells():
    pool = MaxPool(ceil_mode=True)
    assert pool.output_size(75) == 38 and MaxPool().output_size(75) == 37
    x = jnp.arange(9.0).reshape(1, 3, 3, 1) - 100.0  # negative: -inf padding, not 0, must win
    pooled = _tiled_max_pool(x, 2, pool.extra_padding(3))
    np.testing.assert_array_equal(pooled[0, :, :, 0], [[4.0, 5.0], [7.0, 8.0]] - np.float32(100.0))


@pytest.mark.parametrize("size, window, ties", [(6, 2, False), (7, 2, False), (6, 2, True),
                                               (7, 2, True), (8, 3, True)])
def test_tiled_max_pool_has_the_values_and_gradients_of_nnx_max_pool(size, window, ties):
    # Ties (values 0 and 1 only, no ReLU to stop their gradient): the first maximum of each
    # window in row-major order gets the gradient, as in lax's reduce-window max.
    rng = np.random.default_rng(size)
    x = (rng.integers(0, 2, (2, size, size, 3)) if ties
         else rng.standard_normal((2, size, size, 3)))
    x = jnp.asarray(x, jnp.float32)
    extra = MaxPool(window, window, ceil_mode=True).extra_padding(size)

    def tiled(x):
        return _tiled_max_pool(x, window, extra)

    def windowed(x):
        return nnx.max_pool(x, (window,) * 2, strides=(window,) * 2, padding=[(0, extra)] * 2)

    shape = tiled(x).shape
    weights = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)  # distinct gradients
    np.testing.assert_array_equal(tiled(x), windowed(x))
    np.testing.assert_array_equal(jax.grad(lambda x: (tiled(x) * weights).sum())(x),
                                  jax.grad(lambda x: (windowed(x) * weights).sum())(x))


def test_mini_forward_gives_finite_float32_outputs(mini_config, mini_model):
    loc, conf = mini_model(random_images(mini_config, batch=2))
    num_priors = mini_config.priors.num_priors
    assert loc.shape == (2, num_priors, 4) and conf.shape == (2, num_priors, 4)
    assert loc.dtype == conf.dtype == jnp.float32
    assert np.all(np.isfinite(loc)) and np.all(np.isfinite(conf))


def test_uint8_and_float_pixels_give_the_same_outputs(mini_config, mini_model):
    images = random_images(mini_config)
    for a, b in zip(mini_model(images), mini_model(images.astype(np.float32))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


class _GeometryHead(nnx.Module):
    """Stands in for a head: returns a fixed [f, f, n * k] table for every image."""

    def __init__(self, table):
        self.table = nnx.Variable(jnp.asarray(table))

    def __call__(self, x):
        return jnp.broadcast_to(self.table[...], (x.shape[0],) + self.table.shape)


def _geometry_table(priors, k, values_per_box):
    """Head output for map k whose box b at cell (row i, column j) holds that prior's
    (cx, cy, w, h) (loc: 4 values), or cx + class index (conf), built by broadcasting."""
    f, step = priors.feature_map_sizes[k], priors.steps[k] / priors.image_size
    rows, cols = np.meshgrid(np.arange(f), np.arange(f), indexing="ij")
    sizes = np.asarray(cell_boxes(priors, k))  # [n, 2]
    n = len(sizes)
    cx = np.broadcast_to(((cols + 0.5) * step)[:, :, None], (f, f, n))
    cy = np.broadcast_to(((rows + 0.5) * step)[:, :, None], (f, f, n))
    w, h = (np.broadcast_to(sizes[:, d], (f, f, n)) for d in (0, 1))
    if values_per_box == 4:
        table = np.stack([cx, cy, w, h], axis=-1)
    else:
        table = cx[..., None] + np.arange(values_per_box)
    return table.reshape(f, f, n * values_per_box).astype(np.float32)


def test_outputs_are_in_prior_order_map_by_map_cell_row_major_then_box():
    config = ssd_mini(num_classes=2, image_size=64)
    model = SSD(config, rngs=nnx.Rngs(0))
    for k, name in enumerate(config.sources):
        model.loc[name] = _GeometryHead(_geometry_table(config.priors, k, 4))
        model.conf[name] = _GeometryHead(_geometry_table(config.priors, k, 3))
    loc, conf = model(random_images(config, batch=2))
    priors = prior_boxes(config.priors)
    for b in range(2):
        np.testing.assert_allclose(loc[b], priors, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(conf[b], priors[:, :1] + np.arange(3), rtol=1e-6, atol=1e-6)


def test_bfloat16_model_is_close_to_float32_on_the_same_parameters(mini_config, mini_model):
    bf16 = SSD(get_config("ssd_mini", num_classes=3, dtype="bfloat16"), rngs=nnx.Rngs(1))
    nnx.update(bf16, nnx.state(mini_model, nnx.Param))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    images = random_images(mini_config)
    for exact, approx in zip(mini_model(images), bf16(images)):
        assert approx.dtype == jnp.float32
        exact, approx = np.asarray(exact), np.asarray(approx)
        relative_error = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
        assert 0 < relative_error < 0.02  # > 0: the convs really ran in bfloat16


@pytest.mark.parametrize("shape", [
    (2, 64, 64, 3), (2, 128, 128, 1), (2, 128, 128, 4), (128, 128, 3), (2, 3, 128, 128)])
def test_wrong_image_shape_raises(mini_model, shape):
    with pytest.raises(ValueError, match=r"\[B, 128, 128, 3\]"):
        mini_model(np.zeros(shape, np.uint8))


def test_non_numeric_images_raise(mini_model):
    with pytest.raises(ValueError, match="pixel values"):
        mini_model(np.zeros((1, 128, 128, 3), bool))


def test_l2norm_scales_each_cell_to_the_learned_norm_and_has_finite_gradient_at_zero():
    norm = L2Norm(4)
    x = jnp.asarray([[[[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]])
    y = norm(x)
    np.testing.assert_allclose(y[0, 0, 0], [12.0, 16.0, 0.0, 0.0], rtol=1e-6)
    assert not np.any(y[0, 0, 1])
    grad = jax.grad(lambda x: jnp.sum(norm(x)))(x)
    assert np.all(np.isfinite(grad))


def test_registry_builds_every_config_with_overrides():
    assert set(CONFIGS) == {"ssd300", "ssd512", "ssd_mini", "ssd300_coco", "ssd512_coco"}
    coco = get_config("ssd512_coco", num_classes=80)
    assert (coco.name, coco.num_classes, coco.priors.min_sizes[0]) == ("ssd512_coco", 80, 20.48)
    config = get_config("ssd300", num_classes=5, dtype="bfloat16")
    assert (config.name, config.num_classes, config.dtype) == ("ssd300", 5, "bfloat16")
    assert get_config("ssd_mini", image_size=96).priors.image_size == 96
    with pytest.raises(ValueError, match="unknown model"):
        get_config("ssd1000")


@pytest.mark.parametrize("overrides, message", [
    (dict(dtype="float16"), "dtype"), (dict(num_classes=0), "num_classes"),
    (dict(pixel_std=(1.0, 0.0, 1.0)), "pixel_std"),
    (dict(l2norm_source="conv1_1"), "l2norm_source")])
def test_invalid_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        ssd300(**overrides)


def test_priors_that_do_not_fit_the_feature_maps_raise():
    with pytest.raises(ValueError, match="priors expect"):
        dataclasses.replace(ssd300(), priors=ssd512().priors)
    with pytest.raises(ValueError, match="priors expect"):
        dataclasses.replace(ssd300(), sources=ssd300().sources[::-1])
    with pytest.raises(ValueError, match="name no conv layer"):
        dataclasses.replace(ssd300(), sources=ssd300().sources[:-1] + ("conv99",))


@pytest.mark.slow
def test_ssd300_forward_and_backward_give_finite_outputs_and_gradients():
    config = ssd300(num_classes=20)
    graphdef, params = nnx.split(SSD(config, rngs=nnx.Rngs(0)))
    images = jnp.asarray(random_images(config, batch=1))

    def loss(params):
        loc, conf = nnx.merge(graphdef, params)(images)
        return jnp.mean(loc ** 2) + jnp.mean(jax.nn.logsumexp(conf, -1) - conf[..., 0])

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(value)
    leaves = jax.tree.leaves(grads)
    assert sum(leaf.size for leaf in leaves) == 26_285_486
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    assert np.any(np.asarray(grads["backbone"]["conv1_1"]["kernel"][...]))
