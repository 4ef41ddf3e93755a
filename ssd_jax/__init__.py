"""SSD in JAX: jit-able twins of `reference/` plus the Flax detector, training and inference."""


def __getattr__(name):
    # `ssd_jax.Detector` is imported on first use, so `import ssd_jax.boxes` stays light
    # (the detector pulls in the training stack: orbax, grain, matplotlib).
    if name == "Detector":
        from ssd_jax.detector import Detector
        return Detector
    raise AttributeError(f"module 'ssd_jax' has no attribute {name!r}")
