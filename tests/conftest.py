import os

# Tests run on the CPU; several fake devices let sharding tests run anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import HealthCheck, settings  # noqa: E402

# jit compiles once per shape, so the first example of a JAX property is slow:
# no per-example deadline. Examples are kept modest for a 2-core CI machine.
settings.register_profile(
    "default", deadline=None, max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
