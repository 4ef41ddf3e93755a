"""Runs the project's benchmarks and writes their tables to BENCHMARKS.md.

    python -m experiments.benchmark [--quick] [--out BENCHMARKS.md]

The main job as README's first command runs it (`experiments.bench_main_job`; not with
`--quick`), box functions (`experiments.bench_boxes`), the SSD300 train step and inference
(`experiments.bench_train`) and the input pipeline (`experiments.bench_input`), each
with this project's figure, torchvision's and their ratio from the same run. The
torchvision columns need torch and torchvision importable, which this project never
depends on: run it from a virtual environment that has them (see "Reproduce" in the
output); without them those columns read n/a. `--quick` takes fewer timed calls
(noisier figures, about half the time). The load average is sampled during the run
and written down, since other processes on the machine slow every figure.
"""
import argparse
import contextlib
import datetime
import importlib.metadata
import io
import os
import statistics
import threading
from pathlib import Path

import jax

from experiments import (bench_boxes, bench_input, bench_main_job, bench_train,
                         parity_torchvision)
from experiments.benchlib import cpu_threads, machine_info, print_table

# (title, what is measured, run(quick) -> (rows, notes))
SECTIONS = (
    ("The main job",
     "README's first command, `python -m experiments.train_voc --dataset shapes`, from scratch "
     "in a fresh process: wall and CPU time, page faults and peak memory as the operating "
     "system accounts them (`/usr/bin/time -v`'s figures), and the validation mAP of every "
     "evaluation. Skipped with --quick.",
     lambda quick: ([], ["Skipped (--quick)."]) if quick else bench_main_job.run()),
    ("Box functions",
     "Milliseconds per call on SSD300's 8732 priors: the NumPy reference, the jitted JAX twin "
     "and torchvision's own SSD pieces (`ops.box_iou`; `SSDMatcher` + `BoxCoder`; "
     "`SSD.postprocess_detections`). Ratios are times over JAX's: above 1x, JAX is faster.",
     lambda quick: bench_boxes.run(**(dict(rounds=2, repeat=3) if quick else {}))),
    ("Train step and inference",
     "Images per second of the jitted train step (matching, loss, backward, SGD; state donated) "
     "and of inference (forward and on-device detect), against torchvision's "
     "`ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21)` on the same "
     "device; the ratio is ours over torchvision's: above 1x, JAX is faster. On a CPU our "
     "convolutions are oneDNN's (`ssd_jax.onednn`, Winograd's algorithm for the 3x3 stride-1 "
     "ones), where Debian's libdnnl-dev is installed. GFLOP/image: XLA's cost analysis of the "
     "same function with XLA's convolutions (skips kernel taps on padding, counts elementwise "
     "work) and torch's flop counter (convolutions and matmuls, every tap).",
     lambda quick: bench_train.run(repeats=2 if quick else 3)),
    ("Train step and inference, XLA's convolutions",
     "The same, with `cpu_convolutions=\"xla\"`: what a machine without oneDNN runs.",
     lambda quick: bench_train.run(repeats=2 if quick else 3, cpu_convolutions="xla")),
    ("Input pipeline",
     "Host-side work per SSD300 training image (reading it with the VOC folder reader: XML "
     "and JPEG decode; augmentation with the resize to 300x300; padding of the targets), in "
     "CPU time, so the figures hold on a busy machine: "
     "this project's fast transform, its NumPy reference and torchvision's `transforms.v2` "
     "SSD recipe on one thread; then the fast transform through grain's worker processes. "
     "The last column is CPU time over the fast transform's: above 1x, ours is faster.",
     lambda quick: bench_input.run(**(dict(images=16, repeats=1, batches=4) if quick else {}))),
    ("Detections equal to torchvision's",
     "torchvision's `ssd300_vgg16` with random weights (classification head x0.5: confident, "
     "varied scores), its state dict converted by `experiments.convert_ssd --format "
     "torchvision` and run by `Detector.from_checkpoint` with no arguments, beside torchvision "
     "itself on scikit-image's photographs (`experiments.parity_torchvision`). A torchvision "
     "detection is twinned when ours has one of the same label, a score within 1e-4 and every "
     "corner within 0.5 px of the original image. Target: >= 99% twinned.",
     parity_torchvision.section),
)

REPRODUCE = """\
```
sudo apt-get install libdnnl-dev          # oneDNN, for the CPU convolutions (Debian, Ubuntu)
python -m venv torchvenv && . torchvenv/bin/activate
pip install -e . torch==2.14.1 torchvision==0.29.1 scikit-image   # CPU is enough
python -m experiments.benchmark            # rewrites BENCHMARKS.md
```
Without torch the torchvision columns read n/a. Each benchmark also runs alone:
`python -m experiments.bench_boxes`, `python -m experiments.bench_train` (`--model`,
`--batch-size`, `--dtype`, `--cpu-convolutions`, `--peak-tflops` on a GPU),
`python -m experiments.bench_input`,
`python -m experiments.parity_torchvision` (needs scikit-image too).
Threads: XLA uses every core the process may use and torch gets the same count, except in
the input pipeline, where torch's transforms run on one thread as in a DataLoader worker.
Restrict both with `taskset -c 0-N`."""


# Findings of issue 13 (a profile and what did not help), measured by hand: kept verbatim.
CPU_SPEED_NOTES = Path(__file__).resolve().parent.parent / "docs" / "cpu_speed.md"


class LoadSampler:
    """Samples the 1-minute load average every `interval_s` seconds in a background thread."""

    def __init__(self, interval_s: float = 5.0):
        self.interval_s = interval_s
        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        return (f"min {min(self.samples):.2f}, mean {statistics.mean(self.samples):.2f}, "
                f"max {max(self.samples):.2f} over {len(self.samples)} samples")


def versions() -> str:
    names = ("jaxlib", "flax", "optax", "torch", "torchvision")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def markdown_table(rows: list[dict]) -> str:
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        print_table(rows)
    return text.getvalue()


def report(results: list[tuple[str, str, list[dict], list[str]]], *, started: str,
           start_line: str, load: LoadSampler, quick: bool) -> str:
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    devices = jax.devices()
    lines = ["# Benchmarks", "",
             "Written by `python -m experiments.benchmark" + (" --quick" if quick else "")
             + "`; every figure of a table comes from the same run.", "",
             f"- Date: {started}",
             f"- Machine at the start: {start_line}",
             f"- Memory: {memory_gib:.0f} GiB; device: {len(devices)} x "
             f"{devices[0].device_kind} ({devices[0].platform})",
             f"- Also: {versions()}",
             f"- Load average (1 min) during the run: {load.summary()}"]
    if max(load.samples) > cpu_threads():
        lines[-1] += (f", above the {cpu_threads()} usable cores: other processes shared them, "
                      "so absolute figures are pessimistic and noisier than on a quiet machine")
    lines.append("")
    for title, description, rows, notes in results:
        lines += [f"## {title}", "", description, "", markdown_table(rows)]
        lines += [f"{note}  " for note in notes] + [""]
    lines += [CPU_SPEED_NOTES.read_text(), "## Reproduce", "", REPRODUCE, ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timed calls")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args(argv)

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    start_line = machine_info()
    print(start_line, flush=True)
    results = []
    with LoadSampler() as load:
        for title, description, run in SECTIONS:
            print(f"\n{title} ...", flush=True)
            rows, notes = run(args.quick)
            print_table(rows)
            results.append((title, description, rows, notes))
    args.out.write_text(report(results, started=started, start_line=start_line, load=load,
                               quick=args.quick))
    print(f"\nwrote {args.out}; load average during the run: {load.summary()}")


if __name__ == "__main__":
    main()
