"""ssd_jax.platform: large blocks freed by one step are reused by the next, not faulted in anew;
CPU devices per core; the CPU compiler options."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ssd_jax.platform import (CPU_COMPILER_OPTIONS, CPU_INFERENCE_OPTIONS, CPU_RUN_ONCE_OPTIONS,
                              _is_glibc, compiler_options, host_device_count,
                              run_once_compiler_options)

# In a fresh process: a worker thread (as XLA's are) mallocs, fills and frees a block of
# argv[1] MB five times (with malloc itself, as XLA does: NumPy would ask for huge pages); prints the minor
# page faults per round of the last four rounds, and the block's size in pages (what a fresh
# mapping costs).
FAULTS_PER_ROUND = """
import ctypes, resource, sys, threading
import ssd_jax  # applies configure_host_allocator()

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

size = int(sys.argv[1]) * 2**20

def rounds(out):
    for i in range(5):
        if i == 1:
            start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        libc.memset(block, 1, size)
        libc.free(block)
    out.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 4)

out = []
thread = threading.Thread(target=rounds, args=(out,))
thread.start()
thread.join()
print(out[0], size // resource.getpagesize())
"""


def faults_per_round(megabytes, **environment) -> tuple[float, int]:
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_ROUND, str(megabytes)],
                            capture_output=True, text=True, check=True,
                            env={**os.environ, **environment})
    faults, pages = result.stdout.split()
    return float(faults), int(pages)


# 200 MB: the shapes job's scratch block; 2100 MB: above any finite trim threshold mallopt
# takes (2 GB), as SSD300's 3 GB block at batch 8 is.
@pytest.mark.skipif(not _is_glibc(), reason="the allocator settings are glibc's")
@pytest.mark.parametrize("megabytes", [200, 2100])
def test_large_blocks_are_reused_not_faulted_in_again(megabytes):
    faults, pages = faults_per_round(megabytes)
    assert faults < 0.05 * pages
    # The measurement sees the churn when the settings are off (a glibc variable is set).
    control, _ = faults_per_round(megabytes, MALLOC_ARENA_MAX="8")
    assert control > 0.9 * pages


@pytest.mark.parametrize("batch_size, cores, expected", [
    (32, 2, 2), (32, 3, 2), (32, 12, 8), (6, 4, 3), (1, 8, 1), (7, 2, 1), (32, 1, 1), (32, 0, 1)])
def test_host_device_count_is_the_most_devices_that_split_the_batch(batch_size, cores,
                                                                      expected):
    assert host_device_count(batch_size, cores) == expected


# In a fresh process: use_every_core before JAX starts, then the devices JAX sees.
DEVICES_AFTER_USE_EVERY_CORE = """
import os, jax
from ssd_jax.platform import host_device_count, use_every_core, _usable_cores
asked = use_every_core(32)
print(asked, jax.device_count(), host_device_count(32, _usable_cores()))
"""


def devices_after_use_every_core(xla_flags=None) -> list[int]:
    environment = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    if xla_flags is not None:
        environment["XLA_FLAGS"] = xla_flags
    environment["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run([sys.executable, "-c", DEVICES_AFTER_USE_EVERY_CORE],
                            capture_output=True, text=True, check=True, env=environment)
    return [int(word) for word in result.stdout.split()]


def test_use_every_core_gives_jax_one_cpu_device_per_core():
    asked, devices, expected = devices_after_use_every_core()
    assert asked == devices == expected


def test_a_device_count_in_xla_flags_wins_over_use_every_core():
    asked, devices, _ = devices_after_use_every_core(
        "--xla_force_host_platform_device_count=3")
    assert (asked, devices) == (0, 3)


def test_cpu_jits_get_the_memory_ordered_scheduler_and_this_xla_accepts_it(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    options = compiler_options(jax.devices("cpu"))
    assert options == CPU_COMPILER_OPTIONS
    # An option this XLA does not know would fail here, at compile time, with its name.
    compiled = jax.jit(lambda x: x * 2, compiler_options=options).lower(np.ones(3)).compile()
    np.testing.assert_array_equal(compiled(np.ones(3)), 2.0)


def test_cpu_inference_jits_hand_convolutions_over_one_at_a_time_and_this_xla_accepts_it(
        monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    options = compiler_options(jax.devices("cpu"), inference=True)
    assert options == {**CPU_COMPILER_OPTIONS, **CPU_INFERENCE_OPTIONS}
    x = np.arange(2 * 6 * 6 * 3, dtype=np.float32).reshape(2, 6, 6, 3) / 100
    kernel = np.linspace(-1, 1, 3 * 3 * 3 * 4, dtype=np.float32).reshape(3, 3, 3, 4)

    def conv_relu(x):
        return jax.nn.relu(jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))

    compiled = jax.jit(conv_relu, compiler_options=options).lower(x).compile()
    np.testing.assert_allclose(compiled(x), jax.jit(conv_relu)(x), rtol=1e-6, atol=1e-6)


def test_a_scheduler_named_in_xla_flags_wins_over_the_projects(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT")
    assert compiler_options(jax.devices("cpu")) == {}
    assert compiler_options(jax.devices("cpu"), inference=True) == CPU_INFERENCE_OPTIONS


def test_a_ynn_fusion_type_named_in_xla_flags_wins_over_the_projects(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert compiler_options(jax.devices("cpu"), inference=True) == CPU_COMPILER_OPTIONS


def test_run_once_jits_get_no_llvm_optimizations_on_a_cpu_unless_xla_flags_name_them(
        monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert run_once_compiler_options() == CPU_RUN_ONCE_OPTIONS
    compiled = jax.jit(lambda x: x * 2, compiler_options=run_once_compiler_options()).lower(
        np.ones(3)).compile()
    np.testing.assert_array_equal(compiled(np.ones(3)), 2.0)
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=2")
    assert run_once_compiler_options() == {}


def test_other_platforms_get_no_cpu_options():
    class Accelerator:
        platform = "gpu"

    assert compiler_options([Accelerator()]) == {}
    assert compiler_options([Accelerator()], inference=True) == {}
