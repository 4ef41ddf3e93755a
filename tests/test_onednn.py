"""ssd_jax.onednn: oneDNN's convolutions are lax's, values and both gradients, for any
geometry, on one device or split over several; the model's convolutions take them when they
are available; a failed build says why and leaves XLA's convolutions in place."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ssd_jax import onednn, platform

needs_onednn = pytest.mark.skipif(not onednn.available(),
                                  reason=f"oneDNN unavailable: {onednn.unavailable_reason()}")


def lax_conv(x, kernel, strides, padding, dilation):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


def value_and_gradients(conv, x, kernel):
    """The convolution, and the gradients of a non-linear loss of it (every output gets its
    own gradient)."""
    loss = lambda x, kernel: jnp.sin(conv(x, kernel)).sum()
    return (jax.jit(conv)(x, kernel), *jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel))


def assert_close(got, expected):
    # float32 sums in another order: compared to the size of the largest value.
    for ours, lax in zip(got, expected):
        assert ours.shape == lax.shape
        np.testing.assert_allclose(ours, lax, atol=2e-5 * max(1.0, float(np.abs(lax).max())),
                                   rtol=1e-4)


@st.composite
def geometries(draw):
    """A convolution `onednn.conv` takes (`onednn.takes`): square kernels, strides, the same
    padding on both sides of an axis (zero up to the kernel's reach) and dilation, with at
    least one output pixel. The border cases (a kernel reaching past the map, strides that
    skip the last rows) come up often among small sizes."""
    kernel = draw(st.integers(1, 5))
    dilation = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    strides = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    reach = [d * (kernel - 1) for d in dilation]
    padding = tuple((p, p) for p in (draw(st.integers(0, r)) for r in reach))
    smallest = [max(1, r + 1 - 2 * p) for r, (p, _) in zip(reach, padding)]
    size = [draw(st.integers(low, max(low, 12))) for low in smallest]
    batch, channels_in, channels_out = (draw(st.integers(1, n)) for n in (3, 6, 6))
    return ((batch, *size, channels_in), (kernel, kernel, channels_in, channels_out), strides,
            padding, dilation)


@needs_onednn
@settings(max_examples=40)
@given(geometries(), st.booleans(), st.integers(0, 2**31 - 1))
def test_values_and_gradients_are_lax_convolutions(geometry, winograd, seed):
    x_shape, kernel_shape, strides, padding, dilation = geometry
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
    kernel = jnp.asarray(rng.standard_normal(kernel_shape, np.float32))
    got = value_and_gradients(
        lambda x, k: onednn.conv(x, k, strides, padding, dilation, 2, winograd), x, kernel)
    assert_close(got, value_and_gradients(
        lambda x, k: lax_conv(x, k, strides, padding, dilation), x, kernel))


WINOGRAD_SCRIPT = """
import jax.numpy as jnp, numpy as np
from ssd_jax import onednn
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((2, 19, 19, 32), np.float32))
kernel = jnp.asarray(rng.standard_normal((3, 3, 32, 32), np.float32))
print(float(onednn.conv(x, kernel, ({stride}, {stride}), [(1, 1)] * 2, (1, 1), 2, True).sum()))
"""


@needs_onednn
@pytest.mark.parametrize("stride, winograd", [(1, True), (2, False)])
def test_winograd_runs_where_it_applies_and_the_direct_convolution_elsewhere(stride, winograd):
    # oneDNN names the algorithm it runs when DNNL_VERBOSE is set.
    result = subprocess.run([sys.executable, "-c", WINOGRAD_SCRIPT.format(stride=stride)],
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "DNNL_VERBOSE": "1"})
    runs = [line for line in result.stdout.splitlines()
            if ",exec," in line and ",convolution," in line]
    assert runs, result.stdout
    assert all(("alg:convolution_winograd" in line) == winograd for line in runs), result.stdout


@needs_onednn
def test_winograd_convolutions_of_ssd300s_sizes_are_lax_convolutions():
    rng = np.random.default_rng(5)
    for side, channels_in, channels_out in ((38, 64, 128), (19, 512, 512), (10, 256, 256)):
        x = jnp.asarray(rng.standard_normal((2, side, side, channels_in), np.float32))
        # Scaled as Xavier's: outputs of about unit size, whose sine the loss takes.
        kernel = jnp.asarray(rng.standard_normal((3, 3, channels_in, channels_out), np.float32)
                             / np.sqrt(9 * channels_in))
        got = value_and_gradients(
            lambda x, k: onednn.conv(x, k, (1, 1), [(1, 1)] * 2, (1, 1), 2, True), x, kernel)
        assert_close(got, value_and_gradients(
            lambda x, k: lax_conv(x, k, (1, 1), [(1, 1)] * 2, (1, 1)), x, kernel))


@needs_onednn
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_thread_count_gives_the_same_convolution(threads):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 19, 19, 32), np.float32))
    kernel = jnp.asarray(rng.standard_normal((3, 3, 32, 48), np.float32))
    got = value_and_gradients(
        lambda x, k: onednn.conv(x, k, (1, 1), [(1, 1)] * 2, (1, 1), threads), x, kernel)
    assert_close(got, value_and_gradients(
        lambda x, k: lax_conv(x, k, (1, 1), [(1, 1)] * 2, (1, 1)), x, kernel))


@needs_onednn
def test_a_batch_split_over_devices_stays_split_and_the_kernel_gradient_is_summed():
    from jax.sharding import NamedSharding, PartitionSpec
    from ssd_jax.sharding import data_mesh
    mesh = data_mesh()
    assert mesh.size == 8, "conftest sets 8 host devices"
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((16, 10, 10, 3), np.float32))
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 4), np.float32))
    conv = lambda x, k: onednn.conv(x, k, (2, 1), [(1, 1), (2, 2)], (1, 1), 1)
    loss = lambda x, k: jnp.sin(conv(x, k)).sum()
    gradients = jax.jit(jax.grad(loss, argnums=(0, 1)),
                        in_shardings=(NamedSharding(mesh, PartitionSpec("data")),
                                      NamedSharding(mesh, PartitionSpec())))
    hlo = gradients.lower(x, kernel).compile().as_text()
    assert "all-gather" not in hlo
    # Each device convolves its own 2 images; the kernel gradient's parts are summed.
    assert "f32[2,10,10,3]" in hlo and "all-reduce" in hlo
    x_gradient, kernel_gradient = gradients(x, kernel)
    assert x_gradient.sharding.spec == PartitionSpec("data")
    expected = jax.grad(lambda x, k: jnp.sin(lax_conv(x, k, (2, 1), [(1, 1), (2, 2)], (1, 1))
                                             ).sum(), argnums=(0, 1))(x, kernel)
    assert_close((x_gradient, kernel_gradient), expected)


@needs_onednn
def test_vmapped_convolutions_are_each_lax_convolution():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((3, 2, 8, 8, 4), np.float32))
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 4, 5), np.float32))
    for kernel_axis in (0, None):  # a kernel per element, and one kernel for all
        ours, lax = (jax.vmap(lambda x, k: value_and_gradients(
            lambda x, k: conv(x, k, (1, 1), [(1, 1)] * 2, (1, 1)), x, k),
            in_axes=(0, kernel_axis))(x, kernel if kernel_axis == 0 else kernel[0])
            for conv in (lambda *a: onednn.conv(*a, 2), lax_conv))
        assert_close(ours, lax)


@needs_onednn
@pytest.mark.parametrize("strides, padding, kernel_shape, by_onednn", [
    ((1, 1), "SAME", (3, 3, 3, 4), True),
    ((2, 2), "VALID", (3, 3, 3, 4), True),
    ((2, 1), [(2, 2), (1, 1)], (3, 3, 3, 4), True),
    ((2, 2), "SAME", (3, 3, 3, 4), False),        # one more row of padding below than above
    ((1, 1), [(3, 1), (1, 1)], (3, 1, 3, 3), False),  # the geometry oneDNN 2.6 got wrong
])
def test_the_models_float32_convolutions_go_to_onednn_where_it_takes_them(
        strides, padding, kernel_shape, by_onednn):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 9, 10, 3), np.float32))
    kernel = jnp.asarray(rng.standard_normal(kernel_shape, np.float32))
    conv = lambda x, k: platform.conv_general_dilated(
        x, k, strides, padding, rhs_dilation=(1, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert ("ssd_jax_conv_forward" in jax.jit(conv).lower(x, kernel).as_text()) == by_onednn
    expected = lambda x, k: jax.lax.conv_general_dilated(
        x, k, strides, padding, rhs_dilation=(1, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)
    assert_close(value_and_gradients(conv, x, kernel), value_and_gradients(expected, x, kernel))


@needs_onednn
def test_a_geometry_onednn_does_not_take_is_refused_by_name():
    with pytest.raises(ValueError, match="square kernels with the same padding"):
        onednn.conv(jnp.ones((1, 11, 11, 3)), jnp.ones((3, 1, 3, 3)), (1, 1), [(3, 1), (1, 1)],
                    (1, 1), 2)


@needs_onednn
def test_other_convolutions_stay_with_lax():
    spec = ("NHWC", "HWIO", "NHWC")
    x = jnp.ones((1, 8, 8, 4))
    bfloat16 = lambda x: platform.conv_general_dilated(
        x.astype(jnp.bfloat16), jnp.ones((3, 3, 4, 4), jnp.bfloat16), (1, 1), [(1, 1)] * 2,
        dimension_numbers=spec)
    grouped = lambda x: platform.conv_general_dilated(
        x, jnp.ones((3, 3, 2, 4)), (1, 1), [(1, 1)] * 2, dimension_numbers=spec,
        feature_group_count=2)
    input_dilated = lambda x: platform.conv_general_dilated(
        x, jnp.ones((3, 3, 4, 4)), (1, 1), [(1, 1)] * 2, lhs_dilation=(2, 2),
        dimension_numbers=spec)
    for fn in (bfloat16, grouped, input_dilated):
        assert "ssd_jax_conv" not in jax.jit(fn).lower(x).as_text()


def environment_without_a_switch_off(**environment) -> dict:
    """This process's environment and `environment`, but not an SSD_JAX_ONEDNN=0 the user set
    (the build tests below ask for the build itself)."""
    inherited = {key: value for key, value in os.environ.items() if key != "SSD_JAX_ONEDNN"}
    return {**inherited, **environment}


def build_in_a_fresh_process(tmp_path, **environment):
    """`onednn.unavailable_reason()` in a new process with `environment` set, and what that
    process wrote to stderr."""
    script = "from ssd_jax import onednn; print(onednn.unavailable_reason())"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=environment_without_a_switch_off(
                                **{"SSD_JAX_CACHE": str(tmp_path), **environment}), check=True)
    return result.stdout.strip(), result.stderr


def test_a_missing_compiler_is_named_and_xla_keeps_the_convolutions(tmp_path):
    reason, stderr = build_in_a_fresh_process(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert "no-such-compiler" in reason and "CXX" in reason
    assert "Warning" not in stderr  # a machine without oneDNN is not a problem
    script = ("import jax, jax.numpy as jnp; from ssd_jax import platform; "
              "x = jnp.ones((1, 5, 5, 2)); k = jnp.ones((3, 3, 2, 3)); "
              "print('ssd_jax_conv' in jax.jit(lambda x: platform.conv_general_dilated(x, k, "
              "(1, 1), [(1, 1)] * 2, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))).lower(x)"
              ".as_text())")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=environment_without_a_switch_off(
                                SSD_JAX_CACHE=str(tmp_path),
                                CXX=str(tmp_path / "no-such-compiler")), check=True)
    assert result.stdout.strip() == "False"


def test_a_failed_build_says_what_the_compiler_said(tmp_path, monkeypatch):
    broken = tmp_path / "onednn_conv.cc"
    broken.write_text("this is not C++;\n")
    monkeypatch.setattr(onednn, "SOURCE", broken)
    monkeypatch.setenv("SSD_JAX_CACHE", str(tmp_path / "cache"))
    if "headers" in str(onednn.unavailable_reason() or ""):
        pytest.skip("no oneDNN headers here: the build is never tried")
    with pytest.raises(onednn.OneDnnUnavailable, match="building onednn_conv.cc failed"):
        onednn._build()
    assert not list((tmp_path / "cache").glob("*.so")), "nothing half-built is left to load"


def test_an_unwritable_cache_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    reason, stderr = build_in_a_fresh_process(tmp_path, SSD_JAX_CACHE=str(blocker / "cache"))
    if "headers" in reason or "compiler" in reason:
        pytest.skip(f"the build is never tried here: {reason}")
    assert "failed" in reason and str(blocker) in reason
    assert "RuntimeWarning" in stderr and "stay XLA's" in stderr


def test_ssd_jax_onednn_0_turns_the_path_off(tmp_path):
    assert build_in_a_fresh_process(tmp_path, SSD_JAX_ONEDNN="0")[0] == "SSD_JAX_ONEDNN=0"


@needs_onednn
def test_calling_it_where_it_is_unavailable_says_why(monkeypatch):
    monkeypatch.setattr(onednn, "available", lambda: False)
    monkeypatch.setattr(onednn, "unavailable_reason", lambda: "no oneDNN in this test")
    with pytest.raises(onednn.OneDnnUnavailable, match="no oneDNN in this test"):
        onednn.conv(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), (1, 1), [(1, 1)] * 2,
                    (1, 1), 1)


@needs_onednn
def test_a_model_runs_its_convolutions_as_its_config_says():
    from flax import nnx
    from ssd_jax.model import create_ssd, get_config
    images = jnp.zeros((1, 64, 64, 3))
    programs = {}
    for choice in ("onednn", "onednn_direct", "xla"):
        model = create_ssd(get_config("ssd_mini", image_size=64, cpu_convolutions=choice))
        programs[choice] = jax.jit(lambda images: model(images)).lower(images).as_text()
    convolutions = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Conv)]
    for choice, winograd in ("onednn", "true"), ("onednn_direct", "false"):
        calls = [line for line in programs[choice].splitlines() if "ssd_jax_conv_forward" in line]
        assert len(calls) == len(convolutions) == 22
        assert all(f"winograd = {winograd}" in line for line in calls)
    assert "ssd_jax_conv" not in programs["xla"]


def test_an_unknown_cpu_convolutions_is_refused_by_name():
    from ssd_jax.flags import ConfigError
    from ssd_jax.model import get_config
    from ssd_jax.train import TrainConfig
    with pytest.raises(ValueError, match="cpu_convolutions must be one of"):
        get_config("ssd_mini", cpu_convolutions="mkl")
    with pytest.raises(ConfigError, match="cpu_convolutions"):
        TrainConfig(cpu_convolutions="mkl")
