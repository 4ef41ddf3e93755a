"""Train step and inference speed: this project's jitted JAX vs torchvision, in one run.

    python -m experiments.bench_train [--model ssd300] [--batch-size 8] [--repeats 3]
                                      [--dtype float32] [--peak-tflops T]

Measures on one synthetic batch (`ssd_jax.data.shapes` images at the model's input size,
1..6 objects each, ground truth padded to 50 slots with a mask) with 20 object classes
(21 logits):
  * the train step built by `ssd_jax.train.init_training`: forward, matching and encoding
    of the targets, multibox loss, backward and SGD (momentum 0.9, weight decay 5e-4), the
    state donated;
  * inference, `ssd_jax.inference.make_predict_fn`: forward and on-device `detect`
    (score 0.01, NMS 0.45, 200 detections per image) at batch 1 and B.

Images/s are steady state: each function is lowered and compiled once (that time is the
"compile s" column), called once more to warm up, then timed over `--repeats` calls
(median), alternating with the peer's calls below. GFLOP/image is XLA's cost analysis
of the same function with XLA's own convolutions (the analysis sees nothing inside oneDNN's
FFI calls, `ssd_jax.onednn`) divided by its batch; on a GPU, `--peak-tflops` (the card's
dense peak for the dtype) adds the fraction of it reached.

Peer, when torch and torchvision are importable (never a dependency of this project)
and the model is SSD300: torchvision's `ssd300_vgg16(weights=None, weights_backbone=None,
num_classes=21)`, the same VGG16 + extras network, fed the same images (as [3, H, W]
floats in 0..1) and boxes (pixels, padding dropped). Its train step is `model.train()`,
forward with targets -> loss dict, sum, backward, `torch.optim.SGD` step with the same
momentum and weight decay; inference is `model.eval()` under `torch.inference_mode()`,
whose postprocessing uses the same score, NMS and top-k settings. Its own transform
normalizes and resizes (a 300 -> 300 no-op interpolation) inside the timed call. Its
GFLOP/image (`torch.utils.flop_counter`, on the warmup call) counts every kernel tap of
every convolution and matmul; XLA's skips the taps that fall on padding (many in the
dilated conv6 on its 19x19 map) but adds the elementwise work, so for the same network
it comes out a few percent lower.

Threads: XLA's CPU backend runs on every core the process may use; torch gets the same
count (`torch.set_num_threads`), so both use the same CPU. On a GPU torch runs on CUDA too.
"""
import argparse
import dataclasses
import functools
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from experiments.benchlib import cpu_threads, machine_info, print_table, time_fn
from ssd_jax import onednn
from ssd_jax.platform import CPU_CONVOLUTIONS
from ssd_jax.data.pipeline import pad_targets
from ssd_jax.data.shapes import ShapesDataset
from ssd_jax.inference import make_predict_fn
from ssd_jax.sharding import data_mesh, shard_batch
from ssd_jax.train import TrainConfig, init_training, model_config

try:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from torchvision.models.detection import ssd300_vgg16
except ImportError:
    torch = None

NUM_CLASSES = 20  # object classes: 21 logits with the background
MAX_BOXES = 50


@dataclasses.dataclass(frozen=True)
class Subject:
    """A function to time, already compiled and warmed up: each `call()` processes `images`
    images with `flops` floating-point operations; `compile_s` is None where nothing compiles."""

    call: Callable[[], object]
    images: int
    flops: float
    compile_s: float | None = None


def synthetic_batch(batch_size: int, image_size: int, seed: int = 0) -> dict:
    """{"image" uint8 [B, S, S, 3], "boxes" float32 [B, G, 4] corners in [0, 1],
    "labels" int32 [B, G], "mask" bool [B, G]}, G = MAX_BOXES."""
    shapes = ShapesDataset(num_examples=batch_size, image_size=image_size, seed=seed)
    examples = [pad_targets(shapes[i], MAX_BOXES) for i in range(batch_size)]
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def run(model: str = "ssd300", batch_size: int = 8, repeats: int = 3, dtype: str = "float32",
        peak_tflops: float | None = None, cpu_convolutions: str = "onednn",
        ) -> tuple[list[dict], list[str]]:
    """Measures inference (batch 1 and `batch_size`) and the train step: a table row each,
    and lines describing the workload and the threads.

    Where torchvision is there, its calls alternate with ours, so that a change in the
    load of a shared machine hits both columns alike.
    """
    config = TrainConfig(model=model, batch_size=batch_size, dtype=dtype, max_boxes=MAX_BOXES,
                         cpu_convolutions=cpu_convolutions)
    image_size = model_config(config, NUM_CLASSES).priors.image_size
    batch = synthetic_batch(batch_size, image_size)
    peers = torch_subjects(batch) if torch is not None and model == "ssd300" else {}
    names = {"infer_1": f"{model} inference, B=1", "infer_b": f"{model} inference, B={batch_size}",
             "train": f"{model} train step, B={batch_size}"}
    rows = []
    for key, ours in jax_subjects(config, batch):
        peer = peers.get(key)
        seconds = median_seconds([ours.call] + ([peer.call] if peer else []), repeats)
        row = _row(names[key], ours, seconds[0], peer, seconds[-1])
        if jax.devices()[0].platform == "gpu" and peak_tflops:
            row["% of peak"] = f"{100 * ours.flops / seconds[0] / (peak_tflops * 1e12):.1f}"
        rows.append(row)
    notes = [f"{model}, {dtype}: one batch of {batch_size} synthetic shapes images "
             f"{image_size}x{image_size}, ground truth padded to {MAX_BOXES} slots, "
             f"{NUM_CLASSES} classes (+ background); median of {repeats} timed calls each.",
             threads_line(), convolutions_line(cpu_convolutions)]
    return rows, notes


def median_seconds(calls: list[Callable], repeats: int) -> list[float]:
    """Median wall-clock seconds of each call, the calls timed in turn `repeats` times."""
    seconds = [[time_fn(call, warmup=0, repeat=1) for call in calls] for _ in range(repeats)]
    return [statistics.median(column) for column in zip(*seconds)]


def jax_subjects(config: TrainConfig, batch: dict):
    """Yields ("infer_1" | "infer_b" | "train", Subject). Lazily: the train step donates the
    state that inference reads, so it is built only once inference has been timed."""
    mesh = data_mesh()
    graphdef, state, train_step = init_training(config, NUM_CLASSES, mesh)
    predict = make_predict_fn(graphdef, model_config(config, NUM_CLASSES))
    counted = (_with_xla_convolutions(config, mesh) if config.cpu_convolutions != "xla"
               else _lowerings(predict, state, train_step))
    for key, images in ("infer_1", batch["image"][:1]), ("infer_b", batch["image"]):
        compiled, compile_s = _compile(predict, state.params, state.rest, images)
        yield key, _warm(functools.partial(compiled, state.params, state.rest, images),
                         len(images), _xla_flops(counted["predict"], images), compile_s)

    batch = shard_batch(batch, mesh)
    compiled, compile_s = _compile(train_step, state, batch)

    def step():
        nonlocal state
        state, metrics = compiled(state, batch)
        return state, metrics

    yield "train", _warm(step, len(batch["image"]), _xla_flops(counted["train"], batch),
                         compile_s)


def _with_xla_convolutions(config: TrainConfig, mesh) -> dict:
    """The same predict and train step with XLA's own convolutions, for XLA's count of their
    floating-point operations (its cost analysis sees nothing inside oneDNN's FFI calls), as
    `_lowerings`."""
    config = dataclasses.replace(config, cpu_convolutions="xla")
    graphdef, state, train_step = init_training(config, NUM_CLASSES, mesh)
    return _lowerings(make_predict_fn(graphdef, model_config(config, NUM_CLASSES)), state,
                      train_step)


def _lowerings(predict, state, train_step) -> dict:
    """{"predict": fn(images), "train": fn(batch)}, each returning the lowered function."""
    return {"predict": lambda images: predict.lower(state.params, state.rest, images),
            "train": lambda batch: train_step.lower(state, batch)}


def _compile(jitted, *args):
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def _xla_flops(lower, *args) -> float:
    return float(lower(*args).cost_analysis()["flops"])


def _warm(call, images, flops, compile_s) -> Subject:
    jax.block_until_ready(call())
    return Subject(call, images, flops, compile_s)


def torch_subjects(batch: dict) -> dict[str, Subject]:
    """torchvision's SSD300 on the same batch: inference at batch 1 and B, train step."""
    torch.manual_seed(0)
    torch.set_num_threads(cpu_threads())
    device = "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"
    model = ssd300_vgg16(weights=None, weights_backbone=None,
                         num_classes=NUM_CLASSES + 1).to(device)
    size = batch["image"].shape[1]
    images = [torch.from_numpy(image).permute(2, 0, 1).float().div(255).to(device)
              for image in batch["image"]]
    targets = [{"boxes": torch.from_numpy(boxes[mask] * size).to(device),
                "labels": torch.from_numpy(labels[mask]).long().to(device)}
               for boxes, labels, mask in zip(batch["boxes"], batch["labels"], batch["mask"])]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def train_step():
        model.train()
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    def infer(count):
        model.eval()
        with torch.inference_mode():
            return model(images[:count])

    subjects = {key: (functools.partial(infer, count), count)
                for key, count in (("infer_1", 1), ("infer_b", len(images)))}
    subjects["train"] = (train_step, len(images))
    return {key: _counted(call, count, device) for key, (call, count) in subjects.items()}


def _counted(call, images: int, device: str) -> Subject:
    """The Subject of a torch call, its FLOPs counted on a first (warmup) call."""
    def synced():
        result = call()
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    with FlopCounterMode(display=False) as counter:
        synced()
    return Subject(synced, images, counter.get_total_flops())


def _row(name: str, ours: Subject, our_seconds: float, peer: Subject | None,
         peer_seconds: float) -> dict:
    def gflop(subject):
        return "n/a" if subject is None else f"{subject.flops / subject.images / 1e9:.1f}"

    ours_rate = ours.images / our_seconds
    peer_rate = peer.images / peer_seconds if peer else None
    return {"benchmark": name,
            "JAX images/s": f"{ours_rate:.2f}",
            "torchvision images/s": "n/a" if peer is None else f"{peer_rate:.2f}",
            "JAX/torchvision": "n/a" if peer is None else f"{ours_rate / peer_rate:.2f}x",
            "JAX compile s": f"{ours.compile_s:.1f}",
            "XLA GFLOP/image": gflop(ours),
            "torch GFLOP/image": gflop(peer)}


def threads_line() -> str:
    torch_threads = torch.get_num_threads() if torch is not None else "n/a (not installed)"
    return f"Threads: XLA CPU pool {cpu_threads()}, torch {torch_threads}"


def convolutions_line(cpu_convolutions: str) -> str:
    if jax.devices()[0].platform != "cpu":
        return "Convolutions: XLA's (not a CPU)"
    if cpu_convolutions == "xla" or not onednn.available():
        why = "" if cpu_convolutions == "xla" else f" (oneDNN: {onednn.unavailable_reason()})"
        return f"Convolutions: XLA's{why}"
    return f"Convolutions: oneDNN's ({cpu_convolutions})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ssd300", choices=["ssd300", "ssd512", "ssd_mini"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's peak TFLOP/s for --dtype: adds a %% of peak column")
    parser.add_argument("--cpu-convolutions", default="onednn", choices=sorted(CPU_CONVOLUTIONS),
                        help="how our convolutions run on a CPU (ModelConfig.cpu_convolutions)")
    args = parser.parse_args(argv)

    rows, notes = run(args.model, args.batch_size, args.repeats, args.dtype, args.peak_tflops,
                      args.cpu_convolutions)
    print(machine_info())
    print()
    print_table(rows)
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    main()
