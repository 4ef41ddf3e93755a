"""SSD in JAX: jit-able twins of `reference/` plus the Flax detector, training and inference."""
from ssd_jax.detector import Detector

__all__ = ["Detector"]
