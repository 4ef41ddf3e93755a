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
(median). GFLOP/image is XLA's cost analysis of the compiled function divided by its
batch; on a GPU, `--peak-tflops` (the card's dense peak for the dtype) adds the fraction
of it reached.

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
import time

import jax
import numpy as np

from experiments.benchlib import cpu_threads, machine_info, print_table, time_fn
from reference.priors import prior_boxes
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
class Timing:
    """One measured function: median seconds per call, images per call, FLOPs per call
    (None where unknown) and compile seconds (None where nothing is compiled)."""

    seconds: float
    images: int
    flops: float | None = None
    compile_s: float | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def synthetic_batch(batch_size: int, image_size: int, seed: int = 0) -> dict:
    """{"image" uint8 [B, S, S, 3], "boxes" float32 [B, G, 4] corners in [0, 1],
    "labels" int32 [B, G], "mask" bool [B, G]}, G = MAX_BOXES."""
    shapes = ShapesDataset(num_examples=batch_size, image_size=image_size, seed=seed)
    examples = [pad_targets(shapes[i], MAX_BOXES) for i in range(batch_size)]
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def run(model: str = "ssd300", batch_size: int = 8, repeats: int = 3, dtype: str = "float32",
        peak_tflops: float | None = None) -> list[dict]:
    """Measures the train step and inference (batch 1 and `batch_size`); one row each."""
    config = TrainConfig(model=model, batch_size=batch_size, dtype=dtype, max_boxes=MAX_BOXES)
    image_size = model_config(config, NUM_CLASSES).priors.image_size
    batch = synthetic_batch(batch_size, image_size)
    ours = jax_timings(config, batch, repeats)
    peer = torch_timings(batch, repeats) if torch is not None and model == "ssd300" else {}
    on_gpu = jax.devices()[0].platform == "gpu"
    names = {"train": f"{model} train step, B={batch_size}",
             "infer_1": f"{model} inference, B=1", "infer_b": f"{model} inference, B={batch_size}"}
    rows = []
    for key, name in names.items():
        row = _row(name, ours[key], peer.get(key))
        if on_gpu and peak_tflops:
            achieved = ours[key].flops / ours[key].seconds / (peak_tflops * 1e12)
            row["% of peak"] = f"{100 * achieved:.1f}"
        rows.append(row)
    return rows


def jax_timings(config: TrainConfig, batch: dict, repeats: int) -> dict[str, Timing]:
    """Timings of inference at batch 1 and B, then of the train step (which donates the state)."""
    mesh = data_mesh()
    graphdef, state, train_step = init_training(config, NUM_CLASSES, mesh)
    predict = make_predict_fn(graphdef, prior_boxes(model_config(config, NUM_CLASSES).priors))
    timings = {}
    for key, images in ("infer_1", batch["image"][:1]), ("infer_b", batch["image"]):
        compiled, compile_s = _compile(predict, state.params, state.rest, images)
        seconds = time_fn(lambda: compiled(state.params, state.rest, images),
                          warmup=1, repeat=repeats)
        timings[key] = Timing(seconds, len(images), _xla_flops(compiled), compile_s)

    batch = shard_batch(batch, mesh)
    compiled, compile_s = _compile(train_step, state, batch)

    def step():
        nonlocal state
        state, metrics = compiled(state, batch)
        return state, metrics

    seconds = time_fn(step, warmup=1, repeat=repeats)
    timings["train"] = Timing(seconds, len(batch["image"]), _xla_flops(compiled), compile_s)
    return timings


def _compile(jitted, *args):
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def _xla_flops(compiled) -> float:
    return float(compiled.cost_analysis()["flops"])


def torch_timings(batch: dict, repeats: int) -> dict[str, Timing]:
    """torchvision's SSD300 on the same batch: train step, inference at batch 1 and B."""
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
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    def infer(count):
        with torch.inference_mode():
            return model(images[:count])

    model.train()
    timings = {"train": _time_torch(train_step, len(images), repeats, device)}
    model.eval()
    for key, count in ("infer_1", 1), ("infer_b", len(images)):
        timings[key] = _time_torch(lambda: infer(count), count, repeats, device)
    return timings


def _time_torch(fn, images: int, repeats: int, device: str) -> Timing:
    """Counts FLOPs on a first (warmup) call, then times `repeats` calls."""
    def synced():
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    with FlopCounterMode(display=False) as counter:
        synced()
    return Timing(time_fn(synced, warmup=0, repeat=repeats), images, counter.get_total_flops())


def _row(name: str, ours: Timing, peer: Timing | None) -> dict:
    def gflop(timing):
        return "n/a" if timing is None else f"{timing.flops / timing.images / 1e9:.1f}"

    return {"benchmark": name,
            "JAX images/s": f"{ours.images_per_s:.2f}",
            "torchvision images/s": "n/a" if peer is None else f"{peer.images_per_s:.2f}",
            "JAX/torchvision": "n/a" if peer is None
            else f"{ours.images_per_s / peer.images_per_s:.2f}x",
            "JAX compile s": f"{ours.compile_s:.1f}",
            "XLA GFLOP/image": gflop(ours),
            "torch GFLOP/image": gflop(peer)}


def threads_line() -> str:
    torch_threads = torch.get_num_threads() if torch is not None else "n/a (not installed)"
    return f"Threads: XLA CPU pool {cpu_threads()}, torch {torch_threads}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ssd300", choices=["ssd300", "ssd512", "ssd_mini"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's peak TFLOP/s for --dtype: adds a %% of peak column")
    args = parser.parse_args(argv)

    print(machine_info())
    print()
    print_table(run(args.model, args.batch_size, args.repeats, args.dtype, args.peak_tflops))
    print()
    print(threads_line())


if __name__ == "__main__":
    main()
