"""SSD in JAX: jit-able twins of `reference/` plus the Flax detector, training and inference."""
