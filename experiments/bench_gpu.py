"""The GPU benchmark in one command: SSD300 training and inference beside torchvision,
component timings and a profile summary, written to files.

    python -m experiments.bench_gpu --out OUT          # on the GPU machine (issue 14)
    python -m experiments.bench_gpu --tiny --out OUT   # the same code path on a CPU, in seconds

Measured in the same process, each figure beside torchvision's where it has one:

  * the measured peak of the device: TFLOP/s of a large matmul in float32 and in bfloat16
    (the denominators of the FLOP utilisation below, so it is against this device, not a
    data sheet);
  * the SSD300 train step (`ssd_jax.train.init_training`: forward, matching and encoding,
    multibox loss with hard negative mining, backward, SGD with momentum and weight decay,
    state donated) at each `--batch-sizes`, in float32 and in bfloat16 (bfloat16 compute,
    float32 parameters and loss): images/s, compile seconds, model FLOP utilisation (XLA's
    cost analysis of the compiled step over the measured peak of the dtype) and the step's
    device memory (XLA's memory analysis: arguments + outputs + temporaries - aliased);
  * torchvision's `ssd300_vgg16` train step on the same batch and loss terms (its own SSD
    loss: smooth L1 + cross entropy with 3:1 hard negatives), with its best settings on a
    GPU: autocast bfloat16, channels_last, `cudnn.benchmark`; peak memory from
    `torch.cuda.max_memory_allocated`;
  * inference with postprocessing (forward + on-device `detect`: score 0.01, NMS 0.45,
    200 per image) at each `--infer-batch-sizes`: latency (ms per call) and images/s, beside
    torchvision's `model.eval()` forward with its own postprocessing;
  * where the train step's time goes: the forward pass alone, `build_targets` alone,
    the loss alone, forward + backward, and the whole step, each jitted on its own;
  * a `jax.profiler` trace of a few train steps, summarised as the top operations by
    device time (`profile_top_ops.md`), the raw trace left in `OUT/trace/`.

Writes OUT/gpu_results.json (every figure), OUT/gpu_tables.md (the tables, ready for
BENCHMARKS.md) and OUT/profile_top_ops.md. Images are synthetic shapes at 300x300 with
1..6 objects, ground truth padded to 50 slots, 20 classes + background.

Packages this imports that a bare GPU image may lack (grain, simplejpeg, tqdm, matplotlib)
travel as wheels: `bash experiments/gpu_wheels.sh` fetches them into build/gpu_wheels for
Python 3.12, and `bash experiments/run_gpu.sh` installs them there and runs this script.
"""
import argparse
import collections
import contextlib
import dataclasses
import functools
import gzip
import io
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.bench_train import MAX_BOXES, NUM_CLASSES, synthetic_batch
from experiments.benchlib import machine_info, print_table, time_fn
from reference.priors import prior_boxes
from ssd_jax.inference import make_predict_fn
from ssd_jax.loss import multibox_loss
from ssd_jax.matching import build_targets
from ssd_jax.sharding import data_mesh, shard_batch
from ssd_jax.train import TrainConfig, init_training, model_config

try:
    import torch
    from torchvision.models.detection import ssd300_vgg16
except ImportError:
    torch = None


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str
    batch_sizes: tuple[int, ...]
    infer_batch_sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    repeats: int
    matmul_size: int
    profile_steps: int


FULL = Settings("ssd300", (32, 64, 128), (1, 8, 64), ("float32", "bfloat16"), repeats=10,
                matmul_size=8192, profile_steps=5)
TINY = Settings("ssd_mini", (2, 4), (1, 2), ("float32", "bfloat16"), repeats=2,
                matmul_size=256, profile_steps=2)


def measured_peak_tflops(dtype: str, size: int, repeats: int) -> float:
    """TFLOP/s of a jitted [size, size] @ [size, size] matmul in `dtype` on the default device."""
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(key, (size, size), dtype) for key in keys)
    matmul = jax.jit(lambda a, b: a @ b)
    return 2 * size**3 / time_fn(lambda: matmul(a, b), warmup=1, repeat=repeats) / 1e12


def compile_timed(jitted, *args):
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def device_bytes(compiled) -> int | None:
    """Device memory one call of `compiled` needs, by XLA's memory analysis."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def jax_train(settings: Settings, batch_size: int, dtype: str, peak: float) -> dict:
    """Our train step at one batch size and dtype: images/s, compile s, MFU, memory."""
    config = TrainConfig(model=settings.model, batch_size=batch_size, dtype=dtype,
                         max_boxes=MAX_BOXES)
    mesh = data_mesh()
    _, state, train_step = init_training(config, NUM_CLASSES, mesh)
    batch = shard_batch(synthetic_batch(batch_size, image_size(config)), mesh)
    compiled, compile_s = compile_timed(train_step, state, batch)

    def step():
        nonlocal state
        state, metrics = compiled(state, batch)
        return metrics

    seconds = time_fn(step, warmup=1, repeat=settings.repeats)
    flops = float(compiled.cost_analysis()["flops"])
    return dict(images_per_s=batch_size / seconds, compile_s=compile_s,
                gflop_per_image=flops / batch_size / 1e9,
                mfu=flops / seconds / (peak * 1e12), device_bytes=device_bytes(compiled))


def jax_inference(settings: Settings, batch_sizes, dtype: str = "float32") -> dict:
    """Forward + on-device detect at each batch size: ms per call and images/s."""
    config = TrainConfig(model=settings.model, batch_size=max(batch_sizes), dtype=dtype,
                         max_boxes=MAX_BOXES)
    graphdef, state, _ = init_training(config, NUM_CLASSES, data_mesh())
    predict = make_predict_fn(graphdef, model_config(config, NUM_CLASSES))
    images = synthetic_batch(max(batch_sizes), image_size(config))["image"]
    results = {}
    for size in batch_sizes:
        compiled, compile_s = compile_timed(predict, state.params, state.rest, images[:size])
        seconds = time_fn(functools.partial(compiled, state.params, state.rest, images[:size]),
                          warmup=1, repeat=settings.repeats)
        results[size] = dict(ms=1e3 * seconds, images_per_s=size / seconds, compile_s=compile_s)
    return results


def jax_components(settings: Settings, batch_size: int, dtype: str) -> dict:
    """Milliseconds of the train step's parts, each jitted alone, at one batch size."""
    config = TrainConfig(model=settings.model, batch_size=batch_size, dtype=dtype,
                         max_boxes=MAX_BOXES)
    graphdef, state, train_step = init_training(config, NUM_CLASSES, data_mesh())
    priors = jnp.asarray(prior_boxes(model_config(config, NUM_CLASSES).priors))
    batch = jax.device_put(synthetic_batch(batch_size, image_size(config)))
    def forward(params, rest, images):
        return nnx.merge(graphdef, params, rest)(images)

    def targets(batch):
        return build_targets(batch["boxes"], batch["labels"], batch["mask"], priors,
                             iou_threshold=config.match_iou_threshold)

    def loss(params, rest, batch):
        loc, conf = forward(params, rest, batch["image"])
        loc_target, labels = targets(batch)
        return multibox_loss(loc, conf, loc_target, labels, neg_pos_ratio=config.neg_pos_ratio)["loss"]

    forward_fn, targets_fn, gradient_fn = jax.jit(forward), jax.jit(targets), jax.jit(jax.grad(loss))
    loss_fn = jax.jit(lambda loc, conf, loc_target, labels: multibox_loss(
        loc, conf, loc_target, labels, neg_pos_ratio=config.neg_pos_ratio)["loss"])
    outputs = forward_fn(state.params, state.rest, batch["image"]) + targets_fn(batch)
    parts = {
        "forward": lambda: forward_fn(state.params, state.rest, batch["image"]),
        "build_targets": lambda: targets_fn(batch),
        "loss and mining": lambda: loss_fn(*outputs),
        "forward + backward": lambda: gradient_fn(state.params, state.rest, batch),
    }
    results = {name: 1e3 * time_fn(call, warmup=1, repeat=settings.repeats)
               for name, call in parts.items()}

    def step():
        nonlocal state
        state, metrics = train_step(state, batch)
        return metrics

    results["whole step"] = 1e3 * time_fn(step, warmup=1, repeat=settings.repeats)
    return results


def profile_train_step(settings: Settings, batch_size: int, dtype: str, out: Path) -> list[dict]:
    """Traces `profile_steps` train steps and sums the device time of each operation."""
    config = TrainConfig(model=settings.model, batch_size=batch_size, dtype=dtype,
                         max_boxes=MAX_BOXES)
    mesh = data_mesh()
    _, state, train_step = init_training(config, NUM_CLASSES, mesh)
    batch = shard_batch(synthetic_batch(batch_size, image_size(config)), mesh)
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    trace_dir = out / "trace"
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(settings.profile_steps):
            state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
    return top_operations(next(trace_dir.rglob("perfetto_trace.json.gz")), settings.profile_steps)


# Host-trace events that wrap XLA's operations rather than being one (Python frames, dispatch).
HOST_WRAPPERS = ("$", "ThunkExecutor", "PjitFunction")


def top_operations(trace_file: Path, steps: int, count: int = 25) -> list[dict]:
    """The operations of a perfetto trace with the most total time on the device's streams
    (or on the host's XLA threads where there is no device), in ms per step."""
    events = json.loads(gzip.decompress(trace_file.read_bytes()))["traceEvents"]
    process_names = {e["pid"]: e["args"]["name"] for e in events
                     if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in process_names.items() if "/device:" in name}
    totals, calls = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") != "X" or "dur" not in event:
            continue
        if device_pids and event["pid"] not in device_pids:
            continue
        if not device_pids and event["name"].startswith(HOST_WRAPPERS):
            continue
        totals[event["name"]] += event["dur"]
        calls[event["name"]] += 1
    total = sum(totals.values()) or 1
    return [dict(operation=name, kind=operation_kind(name), ms_per_step=us / 1e3 / steps,
                 share=us / total, calls_per_step=calls[name] / steps)
            for name, us in totals.most_common(count)]


def operation_kind(name: str) -> str:
    """A coarse kind for an operation's name, to say where the time goes."""
    lowered = name.lower()
    for kind, words in (("convolution", ("convolution", "cudnn", "xmma", "implicit_gemm")),
                        ("matmul", ("gemm", "dot", "cublas", "matmul")),
                        ("sort / top-k", ("sort", "topk", "top_k")),
                        ("reduction", ("reduce",)),
                        ("copy / transfer", ("copy", "memcpy", "transpose")),
                        ("fusion (elementwise)", ("fusion", "loop", "input"))):
        if any(word in lowered for word in words):
            return kind
    return "other"


def image_size(config: TrainConfig) -> int:
    return model_config(config, NUM_CLASSES).priors.image_size


def torch_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_model(channels_last: bool):
    torch.manual_seed(0)
    model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1)
    model = model.to(torch_device())
    return model.to(memory_format=torch.channels_last) if channels_last else model


def torch_inputs(batch: dict):
    device, size = torch_device(), batch["image"].shape[1]
    images = [torch.from_numpy(image).permute(2, 0, 1).float().div(255).to(device)
              for image in batch["image"]]
    targets = [{"boxes": torch.from_numpy(boxes[mask] * size).to(device),
                "labels": torch.from_numpy(labels[mask]).long().to(device)}
               for boxes, labels, mask in zip(batch["boxes"], batch["labels"], batch["mask"])]
    return images, targets


def torch_synced(call):
    def synced():
        result = call()
        if torch_device() == "cuda":
            torch.cuda.synchronize()
        return result
    return synced


def torch_train(settings: Settings, batch_size: int, dtype: str) -> dict:
    """torchvision's SSD300 train step: autocast in `dtype` (bfloat16) or float32,
    channels_last and cudnn.benchmark on CUDA."""
    cuda = torch_device() == "cuda"
    torch.backends.cudnn.benchmark = cuda
    model = torch_model(channels_last=cuda)
    images, targets = torch_inputs(synthetic_batch(batch_size, 300))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    amp = dict(device_type=torch_device(), dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        model.train()
        with torch.autocast(**amp):
            losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = time_fn(torch_synced(step), warmup=1, repeat=settings.repeats)
    return dict(images_per_s=batch_size / seconds,
                peak_bytes=torch.cuda.max_memory_allocated() if cuda else None)


def torch_inference(settings: Settings, batch_sizes) -> dict:
    cuda = torch_device() == "cuda"
    torch.backends.cudnn.benchmark = cuda
    model = torch_model(channels_last=cuda).eval()
    images, _ = torch_inputs(synthetic_batch(max(batch_sizes), 300))
    results = {}
    for size in batch_sizes:
        def infer(size=size):
            with torch.inference_mode():
                return model(images[:size])
        seconds = time_fn(torch_synced(infer), warmup=1, repeat=settings.repeats)
        results[size] = dict(ms=1e3 * seconds, images_per_s=size / seconds)
    return results


def run(settings: Settings, out: Path, with_torch: bool) -> dict:
    """Runs every section, saving gpu_results.json after each one, so that a run cut short
    by a time limit still leaves what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    with_torch = with_torch and torch is not None and settings.model == "ssd300"
    results = dict(machine=machine_info(), device=str(jax.devices()[0]),
                   torch=torch.__version__ if with_torch else None,
                   settings=dataclasses.asdict(settings))

    def section(name, measure):
        start = time.perf_counter()
        results[name] = measure()
        (out / "gpu_results.json").write_text(json.dumps(results, indent=2, default=str))
        print(f"[bench_gpu] {name}: {time.perf_counter() - start:.0f} s", flush=True)

    section("peak_tflops", lambda: {
        dtype: measured_peak_tflops(dtype, settings.matmul_size, settings.repeats)
        for dtype in settings.dtypes})
    section("train", lambda: [
        dict(batch_size=size, dtype=dtype,
             jax=jax_train(settings, size, dtype, results["peak_tflops"][dtype]),
             torch=torch_train(settings, size, dtype) if with_torch else None)
        for dtype in settings.dtypes for size in settings.batch_sizes])
    section("inference", lambda: dict(
        jax=jax_inference(settings, settings.infer_batch_sizes),
        torch=torch_inference(settings, settings.infer_batch_sizes) if with_torch else None))
    profiled = dict(batch_size=settings.batch_sizes[len(settings.batch_sizes) // 2],
                    dtype=settings.dtypes[-1])
    section("components", lambda: dict(profiled, ms=jax_components(settings, **profiled)))
    section("profile", lambda: dict(profiled, top=profile_train_step(settings, **profiled, out=out)))
    write_tables(results, out)
    return results


def _ratio(ours, theirs):
    return "n/a" if theirs is None else f"{ours / theirs:.2f}x"


def _mib(value):
    return "n/a" if value is None else f"{value / 2**20:,.0f}"


def table_rows(results: dict) -> dict[str, list[dict]]:
    train = [{"dtype": r["dtype"], "batch": r["batch_size"],
              "JAX images/s": f"{r['jax']['images_per_s']:.1f}",
              "torchvision images/s": "n/a" if r["torch"] is None else f"{r['torch']['images_per_s']:.1f}",
              "JAX/torchvision": _ratio(r["jax"]["images_per_s"],
                                        r["torch"] and r["torch"]["images_per_s"]),
              "JAX compile s": f"{r['jax']['compile_s']:.1f}",
              "MFU": f"{100 * r['jax']['mfu']:.1f}%",
              "JAX step MiB": _mib(r["jax"]["device_bytes"]),
              "torch peak MiB": _mib(r["torch"] and r["torch"]["peak_bytes"])}
             for r in results["train"]]
    ours, theirs = results["inference"]["jax"], results["inference"]["torch"]
    inference = [{"batch": size, "JAX ms": f"{ours[size]['ms']:.2f}",
                  "JAX images/s": f"{ours[size]['images_per_s']:.1f}",
                  "torchvision ms": "n/a" if theirs is None else f"{theirs[size]['ms']:.2f}",
                  "torchvision images/s": "n/a" if theirs is None else f"{theirs[size]['images_per_s']:.1f}",
                  "JAX/torchvision": _ratio(ours[size]["images_per_s"],
                                            theirs and theirs[size]["images_per_s"])}
                 for size in ours]
    components = [{"part": name, "ms": f"{ms:.2f}"} for name, ms in results["components"]["ms"].items()]
    profile = [{"operation": row["operation"][:60], "kind": row["kind"],
                "ms/step": f"{row['ms_per_step']:.3f}", "share": f"{100 * row['share']:.1f}%",
                "calls/step": f"{row['calls_per_step']:.0f}"} for row in results["profile"]["top"]]
    return dict(train=train, inference=inference, components=components, profile=profile)


def write_tables(results: dict, out: Path) -> None:
    rows = table_rows(results)
    titles = dict(train="Train step", inference="Inference with postprocessing",
                  components=(f"Train step parts, batch {results['components']['batch_size']}, "
                              f"{results['components']['dtype']} (ms, each jitted alone)"),
                  profile=(f"Top operations by device time, batch {results['profile']['batch_size']}, "
                           f"{results['profile']['dtype']}"))
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        print(results["machine"], f"\nDevice: {results['device']}; torch {results['torch']}")
        print("Measured peak TFLOP/s (matmul): " + ", ".join(
            f"{dtype} {tflops:.1f}" for dtype, tflops in results["peak_tflops"].items()))
        for key, title in titles.items():
            print(f"\n### {title}\n")
            print_table(rows[key])
    (out / "gpu_tables.md").write_text(text.getvalue())
    with contextlib.redirect_stdout(io.StringIO()) as profile:
        print_table(rows["profile"])
    (out / "profile_top_ops.md").write_text(profile.getvalue())
    print(text.getvalue())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for tables, JSON, trace")
    parser.add_argument("--tiny", action="store_true",
                        help="ssd_mini at batch 2 and 4: checks the whole script in seconds on a CPU")
    parser.add_argument("--no-torch", action="store_true", help="skip torchvision's columns")
    args = parser.parse_args(argv)
    run(TINY if args.tiny else FULL, args.out, with_torch=not args.no_torch)


if __name__ == "__main__":
    main()
