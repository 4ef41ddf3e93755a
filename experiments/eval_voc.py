"""Evaluate a trained SSD on VOC2007 test, a COCO-format split or the shapes validation split:
`python -m experiments.eval_voc --checkpoint DIR [--dataset voc|coco|shapes] [--data-dir D]
[--eval-split S] [--metric voc07|voc12|coco] [--out OUT]`.

Runs batched, jitted inference over the data set and scores it by --metric (default: the
dataset's own, COCO's for coco, VOC2007's 11-point for the others).

--metric coco (pycocotools, `ssd_jax.coco_eval`) prints COCO's table and writes into OUT
(default: eval/ in the training run's folder):

- detections.json: the detections in the COCO results format ([{"image_id", "category_id",
  "bbox": [x, y, w, h] pixels of the original image, "score"}], the dataset's own image and
  category ids), so anyone can score them again against the annotation file (scored here
  with boxes that cross the border clipped and degenerate ones dropped, as the reader does:
  for a file whose boxes lie inside their images, as COCO's, that is the file itself).
- eval.json: the figures AP (@[.5:.95]), AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs,
  ARm, ARl (null where undefined), and each class's AP.

--metric voc07 (the VOC2007 11-point AP) or voc12 (the VOC2010+ area; --area-metric is the
same), for any dataset, prints the per-class AP table and mAP and writes into OUT:

- comp4_det_test_<class name>.txt, one per class: the detections in the VOC devkit's results
  format (Main task, competition 4), one line `<image id> <score> <xmin> <ymin> <xmax> <ymax>`
  per detection.
- pr_curves.png: each class's precision/recall curve, its AP in the legend.
- eval.json: the metric's name, each class's AP and the mAP (null where undefined).

Coordinates in the text files are pixels of the original image in the devkit's 1-based
convention. The VOC readers (ssd_jax.data.voc) turn an annotation's 1-based pixel coordinate p
of an image W pixels wide (H high) into p / W (p / H), so a normalized x is written as x * W
and y as y * H: a ground-truth box written this way gives back its XML numbers, and the devkit
scoring these files against the XML annotations sees the boxes reference.voc_eval scored here
(it scales by the same width and height). Boxes lie in [0, W] x [0, H]; a detection reaching
the image's left or top edge starts at 0, one pixel before pixel 1, as the normalized box does.
Image ids are the data set's ("000001"); for a source without ids (shapes), the example's index.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from flax import nnx

from ssd_jax import inference
from ssd_jax.checkpoint import checkpoints_folder, load_model
from ssd_jax.data.sources import DATASETS, NATURAL_METRICS, DatasetUnavailableError, get_sources
from ssd_jax.evaluation import METRICS, evaluate_source, format_ap_table
from ssd_jax.flags import non_negative_int, positive_int, show_warnings_plainly
from ssd_jax.plots import plot_precision_recall
from ssd_jax.sharding import data_mesh

METRIC_NAMES = {"voc07": "VOC2007 11-point", "voc12": "VOC2010+ area", "coco": "COCO"}
RESULTS_FILE = "comp4_det_test_{}.txt"


def run_folder(checkpoint) -> Path:
    """The folder that holds the checkpoints/ folder of a training run, or the converted
    checkpoint's folder itself (load_model accepts a run folder or its checkpoints/ folder)."""
    folder = checkpoints_folder(checkpoint)
    return folder.parent if folder.name == "checkpoints" else folder


def image_ids(ground_truths) -> list[str]:
    """Each image's id: the source's "image_id", else its index in the source."""
    return [str(gt.get("image_id", index)) for index, gt in enumerate(ground_truths)]


def write_devkit_results(detections, ground_truths, class_names, folder) -> list[Path]:
    """Writes one devkit results file per class (see the module docstring for the format and
    coordinates) and returns their paths, in class order.

    detections / ground_truths: one dict per image, as evaluation.evaluate returns them:
    detections with "boxes" [K, 4] normalized corners, "scores" [K], "labels" [K] in 1..C;
    ground truths with "image_size" (height, width) and optionally "image_id".
    """
    lines = [[] for _ in class_names]
    for image_id, det, gt in zip(image_ids(ground_truths), detections, ground_truths):
        height, width = gt["image_size"]
        pixels = np.asarray(det["boxes"], np.float64) * [width, height, width, height]
        for box, score, label in zip(pixels, det["scores"], det["labels"]):
            # 9 significant digits give back the float32 score, so the ranking is kept.
            lines[label - 1].append(f"{image_id} {score:.9g} "
                                    + " ".join(f"{value:.2f}" for value in box) + "\n")
    paths = [Path(folder) / RESULTS_FILE.format(name) for name in class_names]
    for path, class_lines in zip(paths, lines):
        path.write_text("".join(class_lines))
    return paths


def summary(result: dict, class_names, metric: str, dataset: str) -> dict:
    """eval.json's content; NaN (a class without ground truth) becomes null. COCO's figures
    come under their names (AP, AP50, ...)."""
    def number(value):
        return None if math.isnan(value) else float(value)

    return {"metric": metric, "dataset": dataset, "num_images": len(result["detections"]),
            "map": number(result["map"]),
            **{name: number(value) for name, value in result.get("coco", {}).items()},
            "ap": {name: number(ap) for name, ap in zip(class_names, result["ap"])}}


def main(argv=None) -> dict:
    """Runs the evaluation; returns evaluation.evaluate's dict (with the curves)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a training run's folder (or its checkpoints/ folder)")
    parser.add_argument("--dataset", choices=DATASETS, default="voc")
    parser.add_argument("--data-dir", default="",
                        help="VOCdevkit folder, COCO-format folder or TFDS data dir")
    parser.add_argument("--eval-split", default="",
                        help="coco: the split to evaluate (default val2017); a VOC-format "
                             "folder of your own: the image set (default test)")
    parser.add_argument("--classes", default="",
                        help="voc: your own class names, comma-separated (default: the data's)")
    parser.add_argument("--metric", choices=METRICS, default=None,
                        help="default: the dataset's own (coco for coco, voc07 otherwise)")
    parser.add_argument("--step", type=int, default=None, help="default: the latest")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--eval-examples", type=non_negative_int, default=0,
                        help="evaluate only the first this many examples (0: all)")
    parser.add_argument("--area-metric", action="store_true",
                        help="VOC2010+ area under the PR curve instead of VOC2007 11-point")
    parser.add_argument("--out", default=None,
                        help="output folder (default: eval/ in the training run's folder)")
    args = parser.parse_args(argv)
    if args.area_metric and args.metric not in (None, "voc12"):
        parser.error(f"argument --area-metric: is --metric voc12, not --metric {args.metric}")
    metric = "voc12" if args.area_metric else args.metric or NATURAL_METRICS[args.dataset]
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"argument --out: {args.out} is a file, not a folder")
    show_warnings_plainly()
    mesh = data_mesh()
    # Batches split over the devices where they can (a device count set in XLA_FLAGS may not
    # divide --batch-size); one device otherwise.
    mesh = mesh if args.batch_size % mesh.size == 0 else None

    try:
        loaded = load_model(args.checkpoint, args.step)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    model = loaded.model
    image_size = model.config.priors.image_size
    try:
        _, source, dataset_classes = get_sources(args.dataset, image_size=image_size,
                                                 eval_examples=args.eval_examples,
                                                 data_dir=args.data_dir,
                                                 eval_split=args.eval_split,
                                                 classes=args.classes)
    except DatasetUnavailableError as error:
        sys.exit(f"error: {error}")
    class_names = list(loaded.class_names)
    if list(dataset_classes) != class_names:
        sys.exit(f"error: the checkpoint was trained on the classes {class_names}, not on "
                 f"--dataset {args.dataset}'s {list(dataset_classes)}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # The checkpoint's own inference settings and resize (a converted peer's are the peer's).
    predict = inference.make_predict_fn(graphdef, model.config, loaded.inference, mesh=mesh)
    # Scoring reads each image's unpadded ground truth; the padded targets go unused.
    result = evaluate_source(predict, params, rest, source, batch_size=args.batch_size,
                             max_boxes=1, image_size=image_size, num_classes=len(class_names),
                             resize=loaded.inference.resize, metric=metric,
                             class_names=class_names, mesh=mesh,
                             **({} if metric == "coco" else {"return_curves": True}))

    out = Path(args.out) if args.out else run_folder(args.checkpoint) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    name = METRIC_NAMES[metric]
    if metric == "coco":
        (out / "detections.json").write_text(json.dumps(result["results"]))
        written = "detections.json, eval.json"
    else:
        write_devkit_results(result["detections"], result["ground_truths"], class_names, out)
        plot_precision_recall(result, class_names, out / "pr_curves.png",
                              title=f"{args.dataset}: mAP {result['map']:.4f} ({name})")
        written = f"{RESULTS_FILE.format('<class>')}, pr_curves.png, eval.json"
    report = summary(result, class_names, name, args.dataset)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    print(f"{name} AP on {len(result['detections'])} {args.dataset} images")
    if metric == "coco":
        print(result["table"])
    print(format_ap_table(result, class_names))
    print(f"wrote {out}/: {written}")
    return result


if __name__ == "__main__":
    main()
