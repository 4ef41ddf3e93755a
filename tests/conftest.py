import os

# Tests run on the CPU; 8 fake CPU devices let the sharding tests run anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Threefry's random-bit kernels take ~0.5 s to compile per weight shape on this CPU;
# RBG compiles ~4x faster, and tests need reproducible, not Threefry-identical, weights.
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

from hypothesis import HealthCheck, settings  # noqa: E402

# jit compiles once per shape, so the first example of a JAX property is slow:
# no per-example deadline. Examples are kept modest for a 2-core CI machine.
settings.register_profile(
    "default", deadline=None, max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
