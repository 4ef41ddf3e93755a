"""Small timing and reporting helpers shared by the benchmarks in `experiments/`."""
import os
import platform
import statistics
import time

import jax
import numpy as np

# PyTorch's OpenMP threads spin after each op by default and slow the XLA call that
# follows by ~50% on 2 cores; passive waiting keeps interleaved timings fair. It must
# be set before torch loads, which the benchmarks do after importing this module.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def time_fn(fn, *, warmup: int = 3, repeat: int = 20) -> float:
    """Median wall-clock seconds of one `fn()` call.

    `fn` takes no arguments. JAX outputs are waited for (`block_until_ready`),
    since JAX dispatches asynchronously; NumPy and PyTorch CPU calls return
    finished. The warmup calls absorb compilation and caches; the median,
    unlike the mean, shrugs off the slow calls caused by other processes.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn())
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def cpu_threads() -> int:
    """Cores this process may run on (XLA's CPU thread pool uses all of them)."""
    return len(os.sched_getaffinity(0))


def machine_info() -> str:
    """One line naming the CPU, the usable cores, the load and the library versions."""
    return (f"CPU: {_cpu_model()}, {cpu_threads()} usable cores, "
            f"load average {os.getloadavg()[0]:.2f}; Python {platform.python_version()}, "
            f"NumPy {np.__version__}, JAX {jax.__version__} ({jax.default_backend()})")


def print_table(rows: list[dict]) -> None:
    """Prints rows (dicts sharing the first row's keys) as a markdown table; no rows, nothing."""
    if not rows:
        return
    header = list(rows[0])
    cells = [header] + [[str(row[key]) for key in header] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]

    def line(values):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for values in cells[1:]:
        print(line(values))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for entry in cpuinfo:
                if entry.startswith("model name"):
                    return entry.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
