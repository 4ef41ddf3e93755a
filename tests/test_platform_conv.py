"""ssd_jax.platform.xla_conv_general_dilated: lax's convolution, values and gradients, whichever
way it computes the kernel gradient, with XLA's convolutions (oneDNN's: tests/test_onednn.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax import platform


def convolution(conv, strides, padding, dilation):
    return lambda x, kernel: conv(x, kernel, strides, padding, rhs_dilation=dilation,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def loss(conv, strides, padding, dilation):
    def value(x, kernel):  # a non-linear loss: every output gets its own gradient
        return jnp.sin(convolution(conv, strides, padding, dilation)(x, kernel)).sum()
    return value


@pytest.mark.parametrize("shape, kernel_size, strides, padding, dilation", [
    ((2, 7, 9, 3, 5), 3, (1, 1), [(1, 1)] * 2, (1, 1)),   # SSD's 3x3 convs, a non-square map
    ((1, 13, 13, 4, 6), 3, (1, 1), [(6, 6)] * 2, (6, 6)),  # conv6: dilation 6
    ((2, 6, 8, 3, 2), (3, 5), (1, 1), [(1, 1), (2, 2)], (1, 1)),  # a 3x5 kernel
    ((1, 11, 9, 2, 3), 3, (1, 1), [(2, 2), (1, 1)], (2, 1)),  # dilated in height only
    ((2, 5, 4, 3, 2), 3, (1, 1), [(6, 6)] * 2, (6, 6)),   # the outer taps miss the map entirely
    ((1, 9, 12, 2, 3), 5, (1, 1), [(4, 4), (6, 6)], (2, 3)),  # 5x5, unequal dilations
    ((2, 5, 5, 8, 4), 1, (1, 1), [(0, 0)] * 2, (1, 1)),    # 1x1 convs
    ((2, 9, 9, 3, 4), 3, (2, 2), [(1, 1)] * 2, (1, 1)),    # strided: lax's own gradient
    ((2, 5, 5, 3, 4), 3, (1, 1), [(0, 0)] * 2, (1, 1)),    # unpadded: lax's own gradient
])
def test_values_and_gradients_are_lax_convolutions(shape, kernel_size, strides, padding, dilation,
                                                   monkeypatch):
    # Every size through the matrix products, so that these small cases test them.
    monkeypatch.setattr(platform, "MATMUL_PAYS_FROM", ((0, 0, 0),))
    batch, height, width, channels_in, channels_out = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, height, width, channels_in), np.float32))
    kernel_height, kernel_width = np.broadcast_to(kernel_size, 2)
    kernel = jnp.asarray(rng.standard_normal((kernel_height, kernel_width, channels_in,
                                              channels_out), np.float32))
    ours = loss(platform.xla_conv_general_dilated, strides, padding, dilation)
    lax = loss(jax.lax.conv_general_dilated, strides, padding, dilation)
    outputs = [jax.jit(convolution(conv, strides, padding, dilation))(x, kernel)
               for conv in (platform.xla_conv_general_dilated, jax.lax.conv_general_dilated)]
    np.testing.assert_allclose(*outputs, rtol=1e-5, atol=1e-5)
    for got, expected in zip(jax.jit(jax.grad(ours, argnums=(0, 1)))(x, kernel),
                             jax.jit(jax.grad(lax, argnums=(0, 1)))(x, kernel)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape, kernel_shape, expected", [
    ((2, 19, 19, 1024), (1, 1, 1024, 1024), True),   # SSD300's conv7
    ((2, 150, 150, 64), (3, 3, 64, 128), True),      # SSD300's conv2_1
    ((2, 75, 75, 256), (3, 3, 256, 256), True),      # SSD300's conv3
    ((2, 38, 38, 512), (3, 3, 512, 512), True),      # SSD300's conv4: a smaller map, deep
    ((2, 38, 38, 128), (3, 3, 128, 128), False),     # a smaller map, fewer channels
    ((2, 19, 19, 512), (3, 3, 512, 512), False),     # SSD300's conv5: smaller still
    ((32, 64, 64, 16), (3, 3, 16, 32), False),       # ssd_mini's few channels
    ((2, 38, 38, 512), (3, 3, 512, 84), True),       # SSD300's class head on conv4_3
    ((2, 38, 38, 512), (3, 3, 512, 16), False),      # ... and its box head: too few outputs
    ((2, 19, 19, 1024), (3, 3, 1024, 24), True),     # the box head on conv7
    ((2, 10, 10, 512), (3, 3, 512, 126), False),     # a class head on a smaller map
])
def test_matrix_products_only_where_they_pay(x_shape, kernel_shape, expected):
    assert platform.matmuls_pay(x_shape, kernel_shape) is expected


@pytest.mark.parametrize("cores", [1, 2, 3])
def test_kernel_gradient_is_the_same_over_any_number_of_row_blocks(cores, monkeypatch):
    # 2 x 7 x 9 padded rows, 124 of them used: 2 blocks split them evenly, 3 need zero rows.
    monkeypatch.setattr(platform, "_usable_cores", lambda: cores)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 5, 7, 3), np.float32))
    gradient = jnp.asarray(rng.standard_normal((2, 5, 7, 4), np.float32))
    _, kernel_vjp = jax.vjp(lambda kernel: jax.lax.conv_general_dilated(
        x, kernel, (1, 1), [(1, 1)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")),
        jnp.zeros((3, 3, 3, 4)))
    np.testing.assert_allclose(platform._kernel_gradient(x, gradient, (3, 3, 3, 4), (1, 1)),
                               kernel_vjp(gradient)[0], rtol=1e-5, atol=1e-5)
