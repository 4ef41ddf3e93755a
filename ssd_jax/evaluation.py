"""Evaluation of a model's `inference.make_predict_fn` over a data source or an eval loader:
VOC's AP (`reference.voc_eval`, 11-point "voc07" or area "voc12") or COCO's (`coco_eval`)."""
from tqdm.auto import tqdm

from reference.voc_eval import evaluate_detections
from ssd_jax import coco_eval
from ssd_jax.data import pipeline
from ssd_jax.inference import unbatch_detections


METRICS = ("voc07", "voc12", "coco")


def evaluate(predict, params, rest, loader, num_classes: int, *, use_07_metric=True,
             return_curves=False, num_batches=None) -> dict:
    """VOC evaluation (reference.voc_eval) of `predict` over an eval loader yielding
    (batch, ground_truths); returns evaluate_detections' dict (with the precision/recall
    curves if `return_curves`) plus "detections" and "ground_truths", one per image."""
    detections, ground_truths = predict_all(predict, params, rest, loader, num_batches)
    result = evaluate_detections(detections, ground_truths, num_classes,
                                 use_07_metric=use_07_metric, return_curves=return_curves)
    return dict(result, detections=detections, ground_truths=ground_truths)


def predict_all(predict, params, rest, loader, num_batches=None) -> tuple[list, list]:
    """(detections, ground truths), one dict each per image of the eval loader."""
    detections, ground_truths = [], []
    for batch, truths in tqdm(loader, desc="eval", total=num_batches, leave=False):
        detections += unbatch_detections(predict(params, rest, batch["image"]), batch["valid"])
        ground_truths += truths
    return detections, ground_truths


def evaluate_source(predict, params, rest, source, *, batch_size: int, max_boxes: int,
                    image_size: int, num_classes: int, resize: str = "uint8",
                    metric: str = "voc07", class_names=None, **options) -> dict:
    """`evaluate` over a data source, read by `pipeline.make_eval_loader` (ground truth padded
    to `max_boxes`, images resized to `image_size` by the resize mode `resize`), scored by
    `metric` (one of METRICS); `options` are `evaluate`'s.

    metric "coco": `coco_eval.evaluate_detections` (which needs `class_names`) instead, its
    dict with "detections" and "ground_truths"; "map" is then COCO's AP@[.5:.95] and "ap" each
    class's."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    loader = pipeline.make_eval_loader(source, batch_size=batch_size, max_boxes=max_boxes,
                                       image_size=image_size, resize=resize)
    num_batches = -(-len(source) // batch_size)
    if metric == "coco":
        detections, ground_truths = predict_all(predict, params, rest, loader, num_batches)
        result = coco_eval.evaluate_detections(detections, ground_truths, source, class_names)
        return dict(result, detections=detections, ground_truths=ground_truths)
    return evaluate(predict, params, rest, loader, num_classes, num_batches=num_batches,
                    use_07_metric=metric == "voc07", **options)


def format_ap_table(result: dict, class_names) -> str:
    width = max(len(name) for name in class_names)
    rows = [f"{name:<{width}}  {ap:6.4f}" for name, ap in zip(class_names, result["ap"])]
    return "\n".join(rows + ["-" * (width + 8), f"{'mAP':<{width}}  {result['map']:6.4f}"])
