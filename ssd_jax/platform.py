"""Settings that depend on the platform the process runs on, in one place.

`configure_host_allocator` runs when `ssd_jax` is imported, before JAX starts its threads.

Why: XLA's CPU runtime allocates each execution's scratch memory in one block (203 MB for the
shapes job's train step) and frees it at the end. glibc's malloc serves blocks that large with a
fresh mmap and returns them with munmap, from any thread's arena, so the kernel zeroes and
faults in every page again at every step: 52,000 minor page faults and about a quarter of the
step's CPU time in the kernel. Served from the main heap and never trimmed, the block is reused.
"""
import ctypes
import os
import sys

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

_HOST_ALLOCATOR_SETTINGS = (
    # One arena: the threads' own arenas cannot hold a block above 64 MB and map it afresh.
    (M_ARENA_MAX, 1),
    # Large blocks from the heap rather than from a new mapping each ...
    (M_MMAP_MAX, 0),
    # ... and freed memory kept for the next step rather than handed back to the kernel.
    (M_TRIM_THRESHOLD, 2**31 - 1),
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


def _is_glibc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError):  # not a glibc system
        return False
