"""oneDNN's convolutions on a CPU, called from XLA through JAX's FFI (`onednn_conv.cc`).

Why: XLA's CPU convolutions run SSD300's 3x3 layers 8% to 20% slower than oneDNN's, the
library torchvision's convolutions run on (docs/cpu_speed.md, "oneDNN convolutions").

The handlers are compiled on first use against the system's oneDNN (Debian's `libdnnl-dev`)
with the C++ compiler (`CXX`, default g++), into `SSD_JAX_CACHE` (default
~/.cache/ssd_jax), once per source, jaxlib and oneDNN version. Where either is missing,
`available()` is False, `unavailable_reason()` says why, and `platform.conv_general_dilated`
keeps XLA's convolutions. `SSD_JAX_ONEDNN=0` turns the path off.
"""
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

SOURCE = Path(__file__).with_name("onednn_conv.cc")
HEADER = "oneapi/dnnl/dnnl.hpp"
_TARGETS = {"forward": "SsdConvForward", "input_gradient": "SsdConvInputGradient",
            "kernel_gradient": "SsdConvKernelGradient"}


class OneDnnUnavailable(RuntimeError):
    """The oneDNN handlers could not be built or loaded; the message says why."""


class OneDnnBuildFailed(OneDnnUnavailable):
    """oneDNN's headers are there, but the handlers did not compile or load: worth a warning,
    where a machine without oneDNN is not."""


def available() -> bool:
    """Whether the oneDNN convolutions can run here (and are not turned off)."""
    return unavailable_reason() is None


@functools.cache
def unavailable_reason() -> str | None:
    """Why `available()` is False, or None."""
    if os.environ.get("SSD_JAX_ONEDNN", "1") == "0":
        return "SSD_JAX_ONEDNN=0"
    try:
        _register_targets()
    except OneDnnUnavailable as error:
        if isinstance(error, OneDnnBuildFailed):
            warnings.warn(f"{error}\nThe convolutions stay XLA's.", RuntimeWarning, stacklevel=2)
        return str(error)
    return None


def _register_targets() -> None:
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
    except OSError as error:  # an unwritable cache, a library that does not load
        raise OneDnnBuildFailed(f"building or loading the oneDNN handlers failed: {error}")
    for name, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(f"ssd_jax_conv_{name}",
                                    jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")


def _build() -> Path:
    """The compiled handlers' shared library, built unless the cache has it."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise OneDnnUnavailable(f"no C++ compiler ({compiler!r} not found; set CXX)")
    header = _find_header(compiler)
    stamp = hashlib.sha256(SOURCE.read_bytes() + header.read_bytes()
                           + jax.lib.__version__.encode()).hexdigest()[:16]
    library = _cache_dir() / f"onednn_conv_{stamp}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed, so that processes building at once (pytest's
    # workers) never load a half-written file.
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w",
                   f"-I{jax.ffi.include_dir()}", str(SOURCE), "-ldnnl", "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise OneDnnBuildFailed(f"building {SOURCE.name} failed:\n{result.stderr[-2000:]}")
        os.replace(built, library)
    return library


def _find_header(compiler: str) -> Path:
    """oneDNN's main header on the compiler's include path."""
    result = subprocess.run([compiler, "-xc++", "-E", "-v", "-"], input="", capture_output=True,
                            text=True)
    lines = result.stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("#include <...>")), None)
    for line in lines[start + 1:] if start is not None else []:
        if line.startswith("End of search list"):
            break
        if (Path(line.strip()) / HEADER).exists():
            return Path(line.strip()) / HEADER
    raise OneDnnUnavailable(f"oneDNN's headers ({HEADER}) not found; on Debian or Ubuntu: "
                            "apt-get install libdnnl-dev")


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ssd_jax"
    return Path(os.environ.get("SSD_JAX_CACHE", default))


def conv(x, kernel, strides, padding, dilation, threads, winograd=False):
    """NHWC `x` [N, H, W, I] convolved with HWIO `kernel` [kh, kw, I, O], float32, by oneDNN,
    differentiable in both. `strides` and `dilation` are pairs, `padding` two (low, high)
    pairs of zeros around the map, `threads` the cores one call may use. The same result,
    up to float32 rounding, as `lax.conv_general_dilated(x, kernel, strides, padding,
    rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"))`. With `winograd`,
    oneDNN's Winograd F(4x4, 3x3) algorithm for the 3x3 stride-1 undilated convolutions it
    takes: a quarter of the multiplications, with rounding errors measured no larger than the
    direct algorithm's at SSD300's sizes (docs/cpu_speed.md)."""
    if not available():
        raise OneDnnUnavailable(unavailable_reason())
    if not takes(kernel.shape, padding, dilation):
        raise ValueError(f"onednn.conv takes square kernels with the same padding on both sides, "
                         f"within the kernel's reach; got kernel {kernel.shape}, padding "
                         f"{padding}, dilation {dilation}")
    geometry = (tuple(strides), tuple(tuple(pair) for pair in padding), tuple(dilation),
                int(threads), bool(winograd))
    return _conv(x, kernel, geometry)


def takes(kernel_shape, padding, dilation) -> bool:
    """Whether `conv` takes this geometry: a square kernel, the same padding before and after
    on each axis, no more than the kernel's reach (SSD's convolutions all are). Why: oneDNN
    2.6's input gradient read past its operands for a 3 x 1 kernel with 3 rows of padding
    above and 1 below (found by tests/test_onednn.py), so `platform.conv_general_dilated`
    leaves the other geometries to XLA."""
    kernel_height, kernel_width = kernel_shape[:2]
    return kernel_height == kernel_width and all(
        low == high <= d * (k - 1) for (low, high), d, k in zip(padding, dilation,
                                                                kernel_shape[:2]))


def _output_shape(x_shape, kernel_shape, geometry):
    strides, padding, dilation, _, _ = geometry
    spatial = [(size + low + high - d * (k - 1) - 1) // s + 1
               for size, (low, high), d, k, s in zip(x_shape[1:3], padding, dilation,
                                                     kernel_shape[:2], strides)]
    return (x_shape[0], *spatial, kernel_shape[3])


def _call(name, first, second, out_shape, geometry):
    """The FFI call `name` on this device's arrays."""
    strides, padding, dilation, threads, winograd = geometry
    as_array = functools.partial(np.array, dtype=np.int64)
    return jax.ffi.ffi_call(f"ssd_jax_conv_{name}", jax.ShapeDtypeStruct(out_shape, jnp.float32))(
        first, second, strides=as_array(strides), padding_low=as_array([p[0] for p in padding]),
        padding_high=as_array([p[1] for p in padding]), dilation=as_array(dilation),
        threads=np.int64(threads), winograd=bool(winograd))


# XLA's SPMD partitioner knows nothing of an FFI call: it would gather a batch split over
# devices onto every device and compute the whole batch on each. Each call is therefore told
# how it splits: along the batch only; the kernel gradient, a sum over the batch, sums its
# per-device parts across the devices.
def _batch_axes(shape):
    spec = getattr(getattr(shape, "sharding", None), "spec", None)
    return spec[0] if spec else None


def _partitioned(name, sharding_rule, sums_over_batch):
    """The FFI call `name`, of two NHWC or HWIO arrays into one of the static (global) shape
    `out_shape`, split over devices along the first operand's batch."""
    def call(first, second, geometry, out_shape):
        local_shape = out_shape if sums_over_batch else (first.shape[0], *out_shape[1:])
        return _call(name, first, second, local_shape, geometry)

    def shardings(mesh, arg_shapes, result_shape=None):
        # The mesh axes the batch is split over, if any: the first operand's, or else those
        # the partitioner asks of the result (an output gradient may come unsplit).
        axes = _batch_axes(arg_shapes[0]) or (None if sums_over_batch or result_shape is None
                                              else _batch_axes(result_shape))
        split, whole = NamedSharding(mesh, PartitionSpec(axes)), NamedSharding(mesh,
                                                                              PartitionSpec())
        return axes, (whole if sums_over_batch else split), (split, split if sums_over_batch
                                                             else whole)

    def partition(geometry, out_shape, mesh, arg_shapes, result_shape):
        axes, result_sharding, arg_shardings = shardings(mesh, arg_shapes, result_shape)

        def per_device(first, second):
            result = call(first, second, geometry, out_shape)
            return jax.lax.psum(result, axes) if sums_over_batch and axes else result

        return mesh, per_device, result_sharding, arg_shardings

    partitioned = custom_partitioning(call, static_argnums=(2, 3))
    partitioned.def_partition(
        partition, sharding_rule=sharding_rule,
        infer_sharding_from_operands=lambda geometry, out_shape, mesh, arg_shapes, shape:
        shardings(mesh, arg_shapes)[1],
        # Only the batch ("b") may stay split; the rule names every other axis.
        **({"reduction_factors": ("b",)} if sums_over_batch else {}),
        need_replication_factors=tuple(dict.fromkeys(  # in order of appearance, as Shardy wants
            factor for factor in sharding_rule if factor not in " ,->b")))
    return partitioned


_forward = _partitioned("forward", "b h w c, i j c o -> b y x o", sums_over_batch=False)
_input_gradient = _partitioned("input_gradient", "b y x o, i j c o -> b h w c",
                               sums_over_batch=False)
_kernel_gradient = _partitioned("kernel_gradient", "b h w c, b y x o -> i j c o",
                                sums_over_batch=True)


def _looped_under_vmap(call, *static):
    """`call` with its static arguments bound, which under `jax.vmap` runs once per element
    in a loop: custom_partitioning has no batching rule, and a convolution of a batch per
    element has none of its own to give."""
    return jax.custom_batching.sequential_vmap(lambda first, second: call(first, second, *static))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, kernel, geometry):
    return _looped_under_vmap(_forward, geometry, _output_shape(x.shape, kernel.shape,
                                                                geometry))(x, kernel)


def _conv_forward(x, kernel, geometry):
    return _conv(x, kernel, geometry), (x, kernel)


def _conv_backward(geometry, residuals, y_gradient):
    x, kernel = residuals
    return (_looped_under_vmap(_input_gradient, geometry, x.shape)(y_gradient, kernel),
            _looped_under_vmap(_kernel_gradient, geometry, kernel.shape)(x, y_gradient))


_conv.defvjp(_conv_forward, _conv_backward)
