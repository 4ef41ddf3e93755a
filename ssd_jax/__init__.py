"""SSD in JAX: jit-able twins of `reference/` plus the Flax detector, training and inference."""
from ssd_jax.platform import configure_host_allocator

configure_host_allocator()  # before JAX starts its threads: see ssd_jax/platform.py

from ssd_jax.detector import Detector  # noqa: E402

__all__ = ["Detector"]
