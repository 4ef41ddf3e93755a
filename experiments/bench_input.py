"""Input pipeline throughput of SSD300 training: `python -m experiments.bench_input`.

Writes VOC-sized JPEGs (500x375, smooth colour gradients, pixel noise and filled shapes) with
their XML annotations as a VOCdevkit folder in a temporary folder, then measures the full
host-side work per training image: reading the example with the project's VOC folder reader
(`ssd_jax.data.voc.VOCFolder`: file reads, XML parsing, JPEG decode), `ssd_train_transform(300)`
(augmentation and resize to 300x300) and the loader's own steps, `pipeline.resize_image` (a no-op
on a 300x300 image) and `pipeline.pad_targets`:

  1. in this process, per step, for the fast transform (`ssd_jax.data.augment`), the
     reference (`reference.augment`) and, when torch is importable (never a dependency of this
     project), torchvision's SSD augmentation (`torchvision_ssd_transform`) on one torch thread,
     as in a DataLoader worker;
  2. through `pipeline.make_train_loader` with grain worker processes.

Figures are images per second per CPU core, i.e. images per CPU-second of every process involved,
so they hold on a busy machine; wall-clock rates are printed too. Target: >= 200 per core.
"""
import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageDraw

from experiments.benchlib import print_table
from reference import augment as reference_augment
from ssd_jax.data import augment as fast_augment
from ssd_jax.data.pipeline import make_train_loader, pad_targets, resize_image
from ssd_jax.data.voc import VOC_CLASSES, VOCFolder, annotation_xml

try:
    import torch
    from torchvision import tv_tensors
    from torchvision.transforms import v2
except ImportError:
    torch = None

WIDTH, HEIGHT = 500, 375     # a typical PASCAL VOC image
IMAGE_SIZE = 300             # SSD300
MAX_BOXES = 50               # VOC images hold at most 42 objects
TARGET = 200                 # images/s per core
VOC_TRAINVAL_IMAGES = 16551  # VOC2007 + VOC2012 trainval
STEPS = ("read", "augment", "pad")  # timed separately per image


def write_devkit(directory: Path, count: int, seed: int = 0) -> Path:
    """A VOCdevkit folder in `directory` holding `count` JPEGs with 1..8 filled rectangles or
    ellipses each, their XML annotations (random classes, 1 in 10 objects difficult), and two
    split lists of VOC2007: "trainval" names every image once, "cycled" names them over and over,
    VOC_TRAINVAL_IMAGES lines in all. Returns the VOCdevkit folder."""
    rng = np.random.default_rng(seed)
    root = directory / "VOCdevkit"
    folder = root / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True)
    ids = [f"{index:06d}" for index in range(count)]
    for image_id in ids:
        coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        canvas = Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BILINEAR)
        draw = ImageDraw.Draw(canvas)
        objects = []
        for _ in range(rng.integers(1, 9)):
            width, height = rng.integers(20, WIDTH // 2), rng.integers(20, HEIGHT // 2)
            left, top = rng.integers(0, WIDTH - width), rng.integers(0, HEIGHT - height)
            shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
            shape((left, top, left + width - 1, top + height - 1),
                  fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            objects.append((VOC_CLASSES[rng.integers(len(VOC_CLASSES))], left, top,
                            left + width, top + height, rng.random() < 0.1))
        noisy = np.asarray(canvas, np.int16) + rng.integers(-12, 13, (HEIGHT, WIDTH, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
            folder / "JPEGImages" / f"{image_id}.jpg", quality=90)
        (folder / "Annotations" / f"{image_id}.xml").write_text(
            annotation_xml(WIDTH, HEIGHT, objects))
    lists = folder / "ImageSets" / "Main"
    (lists / "trainval.txt").write_text("\n".join(ids) + "\n")
    cycled = [ids[index % count] for index in range(VOC_TRAINVAL_IMAGES)]
    (lists / "cycled.txt").write_text("\n".join(cycled) + "\n")
    return root


def _cpu_seconds(processes) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def time_steps(source: VOCFolder, transform, repeats: int) -> dict[str, float]:
    """CPU milliseconds per image of each step, the best of `repeats` passes over the source."""
    best = {}
    for _ in range(repeats):
        spent = dict.fromkeys(STEPS, 0.0)
        for index in range(len(source)):
            start = time.process_time()
            example = source[index]
            read = time.process_time()
            example = transform(example, np.random.default_rng(index))
            augmented = time.process_time()
            pad_targets(resize_image(example, IMAGE_SIZE), MAX_BOXES)
            done = time.process_time()
            for key, elapsed in zip(spent, (read - start, augmented - read,
                                            done - augmented)):
                spent[key] += elapsed
        for key, elapsed in spent.items():
            best[key] = min(best.get(key, np.inf), 1e3 * elapsed / len(source))
    best["total"] = sum(best.values())
    return best


def time_loader(source: VOCFolder, transform, workers: int, batches: int, batch_size: int,
                repeats: int) -> tuple[float, float]:
    """(images per CPU-second over this process and the workers, images per wall second) of
    `make_train_loader` over `source`, the best of `repeats` windows of `batches` batches each,
    once the workers have started and delivered a first batch."""
    loader = make_train_loader(source, batch_size=batch_size, max_boxes=MAX_BOXES, seed=0,
                               transform=transform, worker_count=workers, image_size=IMAGE_SIZE)
    per_core = per_second = 0.0
    try:
        next(loader)
        main = psutil.Process()
        processes = [main] + main.children(recursive=True)
        for _ in range(repeats):
            cpu_start, wall_start = _cpu_seconds(processes), time.perf_counter()
            for _ in range(batches):
                next(loader)
            cpu, wall = _cpu_seconds(processes) - cpu_start, time.perf_counter() - wall_start
            per_core = max(per_core, batches * batch_size / cpu)
            per_second = max(per_second, batches * batch_size / wall)
    finally:
        if hasattr(loader, "close"):
            loader.close()
    return per_core, per_second


def torchvision_ssd_transform(image_size: int, mean=reference_augment.MEAN_RGB):
    """torchvision's SSD training augmentation as a `transform(example, rng) -> example`: the "ssd"
    preset of its detection reference scripts (photometric distort, zoom out filled with `mean`,
    min-IoU crop, flip) on tv_tensors, then the resize to `image_size` our transform includes, and
    the removal of boxes the crop cut away. torch's global generator draws, not `rng`."""
    augment = v2.Compose([
        v2.RandomPhotometricDistort(), v2.RandomZoomOut(fill=list(mean)), v2.RandomIoUCrop(),
        v2.RandomHorizontalFlip(), v2.Resize((image_size, image_size)),
        v2.SanitizeBoundingBoxes(labels_getter=lambda inputs: (inputs["labels"],
                                                               inputs["difficult"]))])

    def transform(example, rng):
        height, width = example["image"].shape[:2]
        scale = np.float32([width, height, width, height])
        pixels = np.array(example["image"])  # a writable copy: torch warns on PIL's read-only one
        out = augment({
            "image": tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1)),
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(example["boxes"] * scale),
                                              format="XYXY", canvas_size=(height, width)),
            "labels": torch.from_numpy(example["labels"]),
            "difficult": torch.from_numpy(example["difficult"])})
        return {"image": out["image"].permute(1, 2, 0).numpy(),
                "boxes": out["boxes"].numpy() / np.float32(image_size),
                "labels": out["labels"].numpy(), "difficult": out["difficult"].numpy()}

    return transform


def run(images: int = 64, repeats: int = 3, workers=(2,), batches: int = 16,
        batch_size: int = 32) -> tuple[list[dict], list[str]]:
    """Table rows (one per transform measured in this process, one per grain worker count) and
    lines describing the workload and the target."""
    transforms = {"fast": fast_augment.ssd_train_transform(IMAGE_SIZE),
                  "reference": reference_augment.ssd_train_transform(IMAGE_SIZE)}
    if torch is not None:
        torch.manual_seed(0)
        torch.set_num_threads(1)  # as torch's DataLoader sets in its workers
        transforms["torchvision"] = torchvision_ssd_transform(IMAGE_SIZE)
    with tempfile.TemporaryDirectory() as directory:
        devkit = write_devkit(Path(directory), images)
        source = VOCFolder(devkit, [("2007", "trainval")])
        steps = {name: time_steps(source, transform, repeats)
                 for name, transform in transforms.items()}
        rows = [_row(f"{name}, one process", steps[name], steps["fast"]) for name in steps]
        for count in workers:
            per_core, per_second = time_loader(VOCFolder(devkit, [("2007", "cycled")]),
                                               transforms["fast"], count, batches,
                                               batch_size, repeats)
            rows.append({"pipeline": f"fast, grain {count} workers ({per_second:.0f}/s wall)",
                         **{f"{key} ms": "-" for key in STEPS},
                         "images/s per core": f"{per_core:.0f}", "CPU time / fast's": "-"})
    notes = [f"{images} JPEGs {WIDTH}x{HEIGHT} in a VOCdevkit folder; per image: read (VOCFolder: "
             f"XML, JPEG decode), ssd_train_transform({IMAGE_SIZE}), pad to {MAX_BOXES} boxes. "
             f"One process: CPU ms per image, best of {repeats} passes. Grain: best of {repeats} "
             f"windows of {batches} batches of {batch_size} from a split list naming the JPEGs "
             f"over and over, {VOC_TRAINVAL_IMAGES} examples as VOC07+12 trainval (grain's "
             "shuffle costs about 0.5 ms per example on a 64-example dataset, 5 us on VOC's).",
             f"Target: >= {TARGET} images/s per core."]
    return rows, notes


def _row(name: str, steps: dict[str, float], fast: dict[str, float]) -> dict:
    step_columns = {f"{key} ms": f"{steps[key]:.2f}" for key in STEPS}
    return {"pipeline": name, **step_columns,
            "images/s per core": f"{1e3 / steps['total']:.0f}",
            "CPU time / fast's": f"{steps['total'] / fast['total']:.2f}x"}


def profile(source: VOCFolder, transform, top: int = 15) -> None:
    """cProfile of the single-process loop: where the time goes, by function."""
    profiler = cProfile.Profile()
    profiler.enable()
    time_steps(source, transform, repeats=1)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes or loader windows; the best one counts")
    parser.add_argument("--workers", type=int, nargs="*", default=[2],
                        help="grain worker counts to measure")
    parser.add_argument("--batches", type=int, default=16, help="batches per loader window")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the loop")
    args = parser.parse_args(argv)

    rows, notes = run(args.images, args.repeats, args.workers, args.batches, args.batch_size)
    print(notes[0])
    print_table(rows)
    print("\n".join(notes[1:]))
    if args.profile:
        with tempfile.TemporaryDirectory() as directory:
            devkit = write_devkit(Path(directory), args.images)
            profile(VOCFolder(devkit, [("2007", "trainval")]),
                    fast_augment.ssd_train_transform(IMAGE_SIZE))


if __name__ == "__main__":
    main()
