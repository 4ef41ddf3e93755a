"""Settings that depend on the platform the process runs on, in one place.

`configure_host_allocator` runs when `ssd_jax` is imported, before JAX starts its threads;
`use_every_core` is called by experiments.train_voc before JAX starts its backends, for the
runs that ask for it (`TrainConfig.cpu_device_per_core`: the shapes preset);
`conv_general_dilated` is the model's convolution: oneDNN's on a CPU where it is available
(`ssd_jax.onednn`), else `xla_conv_general_dilated`, XLA's with a CPU-only kernel gradient (and
dilated convolutions as products);
`compiler_options` are the XLA options of the project's jitted functions (a CPU scheduler;
for inference, how convolutions are handed to YNNPACK), `run_once_compiler_options` those of
a program that runs once (no LLVM optimizations).

Why: XLA's CPU runtime allocates each execution's scratch memory in one block (203 MB for the
shapes job's train step) and frees it at the end. glibc's malloc serves blocks that large with a
fresh mmap and returns them with munmap, from any thread's arena, so the kernel zeroes and
faults in every page again at every step: 52,000 minor page faults and about a quarter of the
step's CPU time in the kernel. Served from the main heap and never trimmed, the block is reused
(for blocks of any size: SSD300's at batch 8 is 3 GB).
"""
import ctypes
import functools
import os
import sys

import jax
import jax.numpy as jnp

from ssd_jax import onednn

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

_HOST_ALLOCATOR_SETTINGS = (
    # One arena: the threads' own arenas cannot hold a block above 64 MB and map it afresh.
    (M_ARENA_MAX, 1),
    # Large blocks from the heap rather than from a new mapping each ...
    (M_MMAP_MAX, 0),
    # ... and freed memory kept for the next step rather than handed back to the kernel: -1
    # switches trimming off (mallopt(3)). A finite threshold, even mallopt's largest (2 GB),
    # is below SSD300's scratch block at batch 8 (3 GB), which was then handed back and
    # faulted in again at every step: 800,000 faults, 3.5 to 4 s of system time a step.
    (M_TRIM_THRESHOLD, -1),
)


def configure_host_allocator() -> bool:
    """Makes glibc's malloc keep and reuse large freed blocks (see the module docstring).

    Only on Linux with glibc; elsewhere (macOS, musl) nothing changes. Returns True if the
    settings were applied. The process's memory then stays at its peak instead of shrinking
    between steps, which is what a training or inference loop wants. Settings already given
    through glibc's environment variables win: with any of them set, nothing changes.
    """
    if not _is_glibc() or any(name in os.environ for name in _GLIBC_MALLOC_VARIABLES):
        return False
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(option, value) == 1 for option, value in _HOST_ALLOCATOR_SETTINGS)


_GLIBC_MALLOC_VARIABLES = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_",
                           "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def use_every_core(batch_size: int) -> int:
    """Asks XLA for one CPU device per core (`host_device_count`), so that data-parallel
    training on a CPU splits each batch over all the cores.

    Why: XLA runs each convolution of a small network (ssd_mini's 16 to 96 channels) on one
    core, YNNPACK not splitting work that small, so a 2-core machine sat half idle during the
    shapes job's train step; two devices, each with half the batch, run their convolutions
    side by side (step 277-291 ms -> 179-229 ms, BENCHMARKS.md). Not for large models: XLA
    shares the cores' threads out among the devices, and SSD300's convolutions, which use
    every core on one device, ran slower split (train step 0.46x -> 0.42x torchvision's at
    batch 8; inference, on one of the devices, 0.91x -> 0.57x at batch 1).

    Takes effect only before JAX starts its backends (the first `jax.devices()`), and only on
    the CPU: a GPU or TPU host keeps its accelerators as the default devices. A device count
    already in XLA_FLAGS wins. Returns the count asked for (1: nothing to split), or 0 when
    XLA_FLAGS already names one.
    """
    if _HOST_DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", ""):
        return 0
    count = host_device_count(batch_size, _usable_cores())
    if count > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --{_HOST_DEVICE_COUNT_FLAG}={count}").strip()
    return count


_HOST_DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"


def host_device_count(batch_size: int, cores: int) -> int:
    """The most CPU devices, at most one per core, that split `batch_size` evenly."""
    return max(count for count in range(1, max(1, min(cores, batch_size)) + 1)
               if batch_size % count == 0)


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _is_glibc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError):  # not a glibc system
        return False


# XLA's CPU scheduler orders the HLO for concurrency by default: independent operations are
# placed to run side by side on the thread pool. SSD300's train step then keeps the
# activations and gradients of many layers live at once, and its convolutions, which use
# every core each, compete for the cores and the caches. Ordered to keep memory low, the
# same step at batch 8 took 11.1 to 14.1 s (median per run) instead of 12.9 to 18.0 s in
# five alternating pairs of runs, ssd_mini's (the shapes job) 83 ms instead of 87; inference
# did not change (docs/cpu_speed.md, "The CPU scheduler").
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


# XLA's CPU compiler hands YNNPACK whole chains of convolutions and elementwise work as one
# fusion: SSD300's conv1_1 to conv4_3 at inference, 318 ms at 159 GFLOP/s where the same
# convolutions handed over one at a time run at 180 to 207 GFLOP/s. For inference, one
# convolution per YNNPACK call (the elementwise work and the pools left to XLA's own loops):
# SSD300's forward at batch 1 325 to 352 ms instead of 385 to 406 (best of 9 calls, separate
# processes alternating); no change beyond the noise at batch 8 (2.65 s), nor for SSD512 at
# batch 1 (0.95 to 1.0 s) or ssd_mini's evaluation. Not for training: SSD300's step at batch 8
# took 10.3 to 15.8 s this way against 9.0 to 10.5 s (docs/cpu_speed.md, "Inference: one
# convolution per YNNPACK call").
CPU_INFERENCE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                         "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}


def compiler_options(devices=None, *, inference: bool = False) -> dict:
    """XLA compiler options for a top-level `jax.jit` of the project running on `devices`
    (default: JAX's default backend): `CPU_COMPILER_OPTIONS` on a CPU, with
    `CPU_INFERENCE_OPTIONS` for a function that only runs the model forward (`inference`);
    none elsewhere.

    An option the user names in XLA_FLAGS wins (it is then left out). JAX takes compiler
    options on the outermost jit only, so each jit a user calls directly passes them.
    """
    platform = devices[0].platform if devices is not None else jax.default_backend()
    if platform != "cpu":
        return {}
    return _unless_in_xla_flags(dict(CPU_COMPILER_OPTIONS,
                                     **(CPU_INFERENCE_OPTIONS if inference else {})))


def _unless_in_xla_flags(options: dict) -> dict:
    """`options` but those that XLA_FLAGS names: the user's setting wins."""
    named_in_flags = os.environ.get("XLA_FLAGS", "")
    return {name: value for name, value in options.items() if name not in named_in_flags}


# A program that runs once, such as the draw of a model's initial weights, gains nothing from
# LLVM's optimizations and pays their compile time: ssd_mini's draw compiled and ran in 1.7 to
# 1.8 s without them, 6.9 s with them (SSD300: 3.3 to 3.7 s against 10.0 s; `model.create_ssd`).
CPU_RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0}


def run_once_compiler_options() -> dict:
    """XLA compiler options for a top-level `jax.jit` that runs once on JAX's default
    backend: `CPU_RUN_ONCE_OPTIONS` on a CPU (unless XLA_FLAGS names the option), none
    elsewhere."""
    if jax.default_backend() != "cpu":
        return {}
    return _unless_in_xla_flags(CPU_RUN_ONCE_OPTIONS)


def conv_general_dilated(x, kernel, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, *, winograd=True,
                         **kwargs):
    """`jax.lax.conv_general_dilated`; on a CPU, oneDNN's convolution (`onednn.conv`, with
    its Winograd algorithm where it applies, unless not `winograd`) for the float32 NHWC
    convolutions of a model where oneDNN is available, else `xla_conv_general_dilated`'s.

    Why: oneDNN's convolutions, the ones torchvision runs on, are faster on a CPU than XLA's
    (docs/cpu_speed.md, "oneDNN convolutions").
    """
    spec = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
    if (jax.default_backend() == "cpu" and not kwargs.get("preferred_element_type")
            and _onednn_takes(x, kernel, spec, dimension_numbers, lhs_dilation,
                              feature_group_count)):
        dilation = tuple(rhs_dilation or (1, 1))
        if isinstance(padding, str):
            reach = [d * (k - 1) + 1 for d, k in zip(dilation, kernel.shape[:2])]
            padding = jax.lax.padtype_to_pads(x.shape[1:3], reach, window_strides, padding)
        if onednn.takes(kernel.shape, padding, dilation):
            return onednn.conv(x, kernel, window_strides, padding, dilation, _onednn_threads(),
                               winograd)
    return xla_conv_general_dilated(x, kernel, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    **kwargs)


def xla_conv_general_dilated(x, kernel, window_strides, padding, lhs_dilation=None,
                             rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                             **kwargs):
    """`jax.lax.conv_general_dilated`, with the kernel's gradient computed as matrix
    products on a CPU for the convolutions that keep the map's size.

    Why: XLA's CPU backend computes a convolution's kernel gradient as one convolution
    whose window is the whole feature map, with both operands transposed first; that is
    half of SSD300's train step, and 2x (38x38 maps) to 5x (150x150) slower than
    torch's oneDNN kernel. As a matrix product over row-shifted operands (`_kernel_gradient`)
    it runs at the speed of XLA's dot. Dilated same-size convolutions, whose many taps on the
    padding XLA's CPU convolution multiplies, are one product per tap over the pixels it
    reaches (`_conv_as_tap_products`), forward and backward. Elsewhere (other platforms,
    strided or unpadded convolutions, and the sizes where the products do not pay,
    `matmuls_pay`) this is lax's own convolution.
    """
    dilation = tuple(rhs_dilation or (1, 1))
    spec = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
    keeps_size = (tuple(window_strides) == (1, 1) and tuple(lhs_dilation or (1, 1)) == (1, 1)
                  and feature_group_count == 1 and x.ndim == 4
                  and jax.lax.conv_dimension_numbers(x.shape, kernel.shape, dimension_numbers)
                  == spec
                  and [tuple(pair) for pair in padding]
                  == [(d * (k - 1) // 2,) * 2 for d, k in zip(dilation, kernel.shape[:2])]
                  and all(k % 2 for k in kernel.shape[:2]))
    on_cpu = jax.default_backend() == "cpu" and not kwargs.get("preferred_element_type")
    if on_cpu and keeps_size and dilation != (1, 1):
        return _conv_as_tap_products(x, kernel, dilation, kwargs.get("precision"))
    if not (on_cpu and keeps_size and matmuls_pay(x.shape, kernel.shape)):
        return jax.lax.conv_general_dilated(
            x, kernel, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, **kwargs)
    return _same_size_conv(x, kernel, dilation)


# How a model's convolutions run on a CPU (`ModelConfig.cpu_convolutions`): oneDNN's where it
# is available (`onednn.available()`), else XLA's, with oneDNN's Winograd algorithm for the
# 3x3 stride-1 convolutions ("onednn") or its direct one throughout ("onednn_direct"); XLA's
# always ("xla"). On SSD300 (2 cores, docs/cpu_speed.md), Winograd's outputs and gradients
# are as near XLA's as the direct convolution's, and its train step 1.7x as fast.
CPU_CONVOLUTIONS = {"onednn": conv_general_dilated,
                    "onednn_direct": functools.partial(conv_general_dilated, winograd=False),
                    "xla": xla_conv_general_dilated}


def _onednn_takes(x, kernel, spec, dimension_numbers, lhs_dilation, feature_group_count):
    """Whether oneDNN's convolution (`onednn.conv`) computes this one: a float32 NHWC x HWIO
    convolution, ungrouped, without input dilation, when oneDNN is available."""
    return (x.ndim == 4 and x.dtype == kernel.dtype == jnp.float32 and feature_group_count == 1
            and tuple(lhs_dilation or (1, 1)) == (1, 1) and x.size > 0
            and jax.lax.conv_dimension_numbers(x.shape, kernel.shape, dimension_numbers) == spec
            and onednn.available())


def _onednn_threads() -> int:
    """The cores one oneDNN convolution may use: all of them, shared out among XLA's CPU
    devices when there are several (`use_every_core`), which run side by side."""
    return max(1, _usable_cores() // jax.local_device_count("cpu"))


def _conv_as_tap_products(x, kernel, dilation, precision=None):
    """NHWC x HWIO stride-1 same-size convolution as one matrix product per kernel tap, each
    over only the output pixels whose tap falls inside the map, summed; its gradients are
    JAX's of those products.

    Why: a dilated convolution on a small map has many taps on the zero padding (conv6 of
    SSD300, 3x3 with dilation 6 on 19 x 19: 38% of them), and XLA's CPU convolution multiplies
    them all. Skipping them (2 cores, B=8, forward / forward + backward, ms, two runs): SSD300's
    conv6 174 / 486 and 168 / 450 with lax's, 121 / 266 and 110 / 260 this way; at B=1 25 / 66
    -> 16 / 37; SSD512's conv6 (32 x 32) 492 / 1415 and 809 / 1353 -> 405 / 995 and 361 / 964.
    Not for undilated 3x3 convolutions (19 x 19 x 512: 79 to 83 / 182 to 202 ms against 79 to
    81 / 173 to 180), whose padding is a thin border.
    """
    kernel_height, kernel_width = kernel.shape[:2]
    height, width = x.shape[1:3]
    output = 0
    for i in range(kernel_height):
        for j in range(kernel_width):
            # Output pixel (r, c) reads x at (r + di, c + dj).
            di, dj = dilation[0] * (i - kernel_height // 2), dilation[1] * (j - kernel_width // 2)
            top, bottom = max(0, -di), min(height, height - di)
            left, right = max(0, -dj), min(width, width - dj)
            if top >= bottom or left >= right:  # the tap lies outside the map for every pixel
                continue
            inside = x[:, top + di:bottom + di, left + dj:right + dj]
            product = jnp.matmul(inside, kernel[i, j], precision=precision)
            output += jnp.pad(product, ((0, 0), (top, height - bottom), (left, width - right),
                                        (0, 0)))
    return output


# Where the matrix product beats lax's kernel gradient on a CPU (2 cores of an AMD EPYC,
# 2026-12-02 and 12-03, the jitted kernel gradient alone, time over lax's): 1x1 convs always
# (0.31 to 0.40); 3x3 convs on large maps with >= 64 channels (0.46 at 300 x 300 x 64, 0.20 at
# 150 x 150 x 128, 0.56 to 0.76 at 75 x 75 x 256) and on smaller maps with >= 256 channels
# (0.31 at 64 x 64 x 512, 0.60 to 0.83 at 38 x 38 x 512, 0.65 at 38 x 38, 256 -> 512), but not
# on smaller maps with fewer channels (1.34 at 38 x 38 x 128, 0.87 to 0.96 at 38 x 38 x 64),
# nor on 19 x 19 maps (1.00 to 1.32) or with few channels (1.2 to 2.1 for ssd_mini's 16 to 32
# channels on 32 x 32 to 64 x 64 maps). lax's kernel gradient is slowest with many input
# channels, so SSD300's class heads pay too (ms, two runs each): 38 x 38, 512 -> 84: 99 to
# 128 against 78 to 86; 19 x 19, 1024 -> 126: 109 to 121 against 63 to 73; 1024 -> 24: 30 to 35
# against 22 to 27; but not its 38 x 38 box head, 512 -> 16 (23 to 30 against 33 to 40), nor
# 10 x 10, 512 -> 126 (13 to 18 against 18 to 21).
# (fewest channels in, fewest channels out, fewest pixels per map): the product pays where a
# conv reaches all three figures of one of them.
MATMUL_PAYS_FROM = ((64, 64, 75 * 75), (256, 256, 38 * 38), (512, 64, 38 * 38),
                    (1024, 24, 19 * 19))


def matmuls_pay(x_shape, kernel_shape) -> bool:
    """Whether `_kernel_gradient`'s matrix product beats lax's kernel gradient for a stride-1
    same-size convolution of NHWC `x_shape` by HWIO `kernel_shape` (measured; see above)."""
    kernel_height, kernel_width, channels_in, channels_out = kernel_shape
    if kernel_height == kernel_width == 1:
        return True
    pixels = x_shape[1] * x_shape[2]
    return any(channels_in >= fewest_in and channels_out >= fewest_out and pixels >= fewest_pixels
               for fewest_in, fewest_out, fewest_pixels in MATMUL_PAYS_FROM)


def _lax_same_size_conv(x, kernel, dilation):
    """NHWC x HWIO stride-1 convolution zero-padded to keep the map's size."""
    padding = [(d * (k - 1) // 2,) * 2 for d, k in zip(dilation, kernel.shape[:2])]
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, rhs_dilation=dilation,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


_same_size_conv = jax.custom_vjp(_lax_same_size_conv, nondiff_argnums=(2,))


def _same_size_conv_forward(x, kernel, dilation):
    return _lax_same_size_conv(x, kernel, dilation), (x, kernel)


def _same_size_conv_backward(dilation, residuals, output_gradient):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _lax_same_size_conv(x, kernel, dilation), x)
    return input_vjp(output_gradient)[0], _kernel_gradient(x, output_gradient, kernel.shape,
                                                           dilation)


_same_size_conv.defvjp(_same_size_conv_forward, _same_size_conv_backward)


def _kernel_gradient(x, output_gradient, kernel_shape, dilation):
    """d loss / d kernel of `_same_size_conv`: for each tap (i, j), the sum over pixels of
    x shifted by the tap times the output gradient, [I, O].

    Both operands are flattened to rows of the zero-padded map, where a tap's shift is a
    fixed offset of rows: (i, j) pairs output-gradient row r with x row r + i * row length
    + j. x's column shifts (j) go side by side, [rows, kw * I], and so do the output
    gradient's row shifts (-i), [rows, kh * O]: one matrix product of the two,
    [kh * O, rows] @ [rows, kw * I], holds every tap. One large product runs nearer XLA's
    peak than nine [O, rows] @ [rows, I] ones (2x for 64 channels), and copies six shifted
    operands instead of nine. The output gradient is padded after each row and image with as
    many zeros as x is around them, so the rows that wrap around a row's end multiply zeros.
    """
    (kh, kw, channels_in, channels_out), (dh, dw) = kernel_shape, dilation
    ph, pw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
    batch, height, width, _ = x.shape
    padded_width = width + 2 * pw
    rows = batch * (height + 2 * ph) * padded_width
    x_rows = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0))).reshape(rows, channels_in)
    gradient_rows = jnp.pad(output_gradient, ((0, 0), (0, 2 * ph), (0, 2 * pw), (0, 0))
                            ).reshape(rows, channels_out)
    used_rows = rows - (kw - 1) * dw  # x rows that every column shift reaches
    x_columns = jnp.concatenate([x_rows[j * dw:j * dw + used_rows] for j in range(kw)], axis=1)
    gradient_shifts = jnp.concatenate(
        [jnp.pad(gradient_rows, ((i * dh * padded_width, 0), (0, 0)))[:used_rows]
         for i in range(kh)], axis=1)
    # [(i, O), (j, I)]
    taps = _product_over_rows(gradient_shifts, x_columns, min(channels_in, channels_out))
    return taps.reshape(kh, channels_out, kw, channels_in).transpose(0, 2, 3, 1)


# XLA's CPU dot splits a product with a small output and a long sum ([3 O, rows] @ [rows, 3 I]
# for a layer with few channels) poorly over the cores; as a batch of row blocks, one per
# core, summed after, it ran faster (2 cores, the product alone, ms, best of 5, two runs):
# conv1_2's [729630, 192] x [729630, 192] 469 -> 344 and 538 -> 388; conv2_1's 192 x 384 269 ->
# 189 and 279 -> 176; conv2_2's 384 x 384 516 -> 346 and 372 -> 313; but conv3's 768 x 768
# 341 -> 351, 322 -> 319 and conv4's 1536 x 1536 348 -> 375: so only up to 128 channels.
ROW_BLOCKS_UP_TO_CHANNELS = 128


def _product_over_rows(a, b, channels):
    """a^T @ b for a [rows, M] and b [rows, N], summed over blocks of rows, one per core,
    when the layer has at most `ROW_BLOCKS_UP_TO_CHANNELS` channels (see above)."""
    blocks = _usable_cores() if channels <= ROW_BLOCKS_UP_TO_CHANNELS else 1
    if blocks == 1:
        return a.T @ b
    extra_rows = -a.shape[0] % blocks  # zero rows, which add nothing to the sums
    a, b = (jnp.pad(t, ((0, extra_rows), (0, 0))).reshape(blocks, -1, t.shape[1]) for t in (a, b))
    per_block = jax.lax.dot_general(a, b, (((1,), (1,)), ((0,), (0,))))  # [blocks, M, N]
    return per_block.sum(axis=0)
