"""The `ssd-jax` command.

    ssd-jax detect --checkpoint runs/shapes photos/ extra.jpg --out detections/

writes to OUT, for every readable image among the inputs (files, and the files of folders):
  <stem>.png (or .jpg for JPEG inputs)  the image with its detections above
                   --display-threshold drawn
  detections.json  COCO results of every detection (scores above the checkpoint's score
                   threshold, or --score-threshold): [{"image_id", "category_id",
                   "bbox": [x, y, w, h] pixels, "score"}], category_id = the checkpoint's label
                   (1..C, or its own label space, e.g. COCO ids for torchvision's COCO model)
  images.json      the COCO dataset skeleton the results refer to: {"images": [{"id",
                   "file_name", "width", "height", "source" (input path)}], "categories":
                   [{"id", "name"}]}, so pycocotools loads them with
                   `COCO("images.json").loadRes("detections.json")`.
Unreadable and missing files are reported on stderr and skipped. OUT must be a new or empty
folder unless --overwrite is given.
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import absl.logging
from tqdm.auto import tqdm

from ssd_jax.coco_eval import result_records
from ssd_jax.detector import Detector, draw_detections, load_image
from ssd_jax.flags import positive_int, show_warnings_plainly, unit_interval

# Shows what the model is fairly sure of without hiding many true objects. The detections
# themselves go down to the checkpoint's score threshold (0.01, the paper's section 3.7, for
# mAP: average precision rewards every extra true positive).
DEFAULT_DISPLAY_THRESHOLD = 0.3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ssd-jax", description="SSD object detection.")
    commands = parser.add_subparsers(dest="command", required=True)
    detect = commands.add_parser(
        "detect", help="detect objects in images", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    detect.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    detect.add_argument("--checkpoint", required=True,
                        help="a training run's folder (or its checkpoints/ folder)")
    detect.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    detect.add_argument("--out", required=True, type=Path,
                        help="output folder: new or empty, unless --overwrite")
    detect.add_argument("--overwrite", action="store_true",
                        help="write into --out even if it holds files (same names are replaced)")
    detect.add_argument("--display-threshold", type=unit_interval,
                        default=DEFAULT_DISPLAY_THRESHOLD,
                        help="draw only detections scoring above this (default "
                             f"{DEFAULT_DISPLAY_THRESHOLD}); detections.json has them all")
    detect.add_argument("--score-threshold", type=unit_interval, default=None,
                        help="minimum class probability of a detection (default: the "
                             "checkpoint's, 0.01 for training runs and most peers)")
    detect.add_argument("--iou-threshold", type=unit_interval, default=None,
                        help="per-class NMS overlap threshold (default: the checkpoint's, 0.45)")
    detect.add_argument("--top-k", type=positive_int, default=None,
                        help="most detections per image (default: the checkpoint's)")
    detect.add_argument("--batch-size", type=positive_int, default=8,
                        help="images per compiled call (default 8)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        detect.error(f"argument --out: {args.out} is a file, not a folder")
    absl.logging.set_verbosity(absl.logging.ERROR)  # orbax's notes on read-only checkpoints
    show_warnings_plainly()
    return run_detect(args)


def run_detect(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in ("score_threshold", "iou_threshold", "top_k")
                 if getattr(args, name) is not None}
    try:
        detector = Detector.from_checkpoint(args.checkpoint, step=args.step,
                                            batch_size=args.batch_size, **overrides)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    files, missing = list_inputs(args.inputs)
    if any(path.resolve().parent == args.out.resolve() for path in files):
        sys.exit(f"error: --out {args.out} holds input images, which annotated images of the "
                 "same name would overwrite: choose another folder")
    if args.out.is_dir() and not args.overwrite and any(args.out.iterdir()):
        sys.exit(f"error: --out {args.out} already holds files ({_listing(args.out)}), which "
                 "this run's files of the same name would replace: choose a new or empty "
                 "folder, or pass --overwrite")
    args.out.mkdir(parents=True, exist_ok=True)
    images, results, output_names = [], [], set()
    readable = _readable_images(tqdm(files, desc="detect", unit="image"))
    for chunk in _chunks(readable, args.batch_size):
        for (path, image), detections in zip(chunk, detector([image for _, image in chunk])):
            image_id = len(images) + 1
            name = _output_name(path, output_names)
            draw_detections(image, above(detections, args.display_threshold)).save(
                args.out / name)
            images.append({"id": image_id, "file_name": name, "source": str(path),
                           "width": image.shape[1], "height": image.shape[0]})
            results += result_records(image_id, detections["boxes"], detections["scores"],
                                      detections["labels"])  # labels: the dataset's ids

    categories = [{"id": int(i), "name": name}
                  for i, name in zip(detector.label_ids, detector.class_names)]
    (args.out / "images.json").write_text(json.dumps(
        {"images": images, "categories": categories}, indent=1))
    (args.out / "detections.json").write_text(json.dumps(results))
    print(f"{len(results)} detections in {len(images)} images written to {args.out} "
          f"({len(files) - len(images)} unreadable and {missing} missing inputs skipped)")
    if not images:
        sys.exit("error: none of the inputs is a readable image")
    return 0


def list_inputs(inputs) -> tuple[list[Path], int]:
    """(The given files, and the files (not hidden, not in subfolders) of the given folders,
    sorted by name; the number of missing paths, which are reported on stderr)."""
    files, missing = [], 0
    for name in map(Path, inputs):
        if name.is_dir():
            files += sorted(p for p in name.iterdir() if p.is_file() and not p.name.startswith("."))
        elif name.exists():
            files.append(name)
        else:
            print(f"skipped {name}: no such file or folder", file=sys.stderr)
            missing += 1
    return files, missing


def _listing(folder: Path, count: int = 3) -> str:
    names = sorted(path.name for path in folder.iterdir())
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count
                                       else "")


def above(detections: dict, threshold: float) -> dict:
    """The detections scoring above `threshold`."""
    keep = detections["scores"] > threshold
    return {key: ([v for v, k in zip(value, keep) if k] if isinstance(value, list) else value[keep])
            for key, value in detections.items()}


def _readable_images(paths):
    """(path, uint8 [H, W, 3] image) of each readable file; the others are reported on stderr."""
    for path in paths:
        try:
            yield path, load_image(path)
        except ValueError as error:
            tqdm.write(f"skipped: {error}", file=sys.stderr)


def _chunks(iterable, size: int):
    """Lists of `size` consecutive items (the last one shorter)."""
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _output_name(path: Path, taken: set) -> str:
    """<stem>.png (.jpg for JPEG inputs), numbered if two inputs share a stem."""
    suffix = ".jpg" if path.suffix.lower() in (".jpg", ".jpeg") else ".png"
    name, number = path.stem + suffix, 1
    while name in taken:
        name, number = f"{path.stem}_{number}{suffix}", number + 1
    taken.add(name)
    return name


if __name__ == "__main__":
    sys.exit(main())
