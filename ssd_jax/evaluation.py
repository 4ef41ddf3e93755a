"""VOC evaluation (`reference.voc_eval`) of a model's `inference.make_predict_fn` over a
data source or an eval loader."""
from tqdm.auto import tqdm

from reference.voc_eval import evaluate_detections
from ssd_jax.data import pipeline
from ssd_jax.inference import unbatch_detections
from ssd_jax.sharding import is_main_process, shard_global_batch


def evaluate(predict, params, rest, loader, num_classes: int, *, mesh=None, use_07_metric=True,
             return_curves=False, num_batches=None) -> dict:
    """VOC evaluation (reference.voc_eval) of `predict` over an eval loader yielding
    (batch, ground_truths); returns evaluate_detections' dict (with the precision/recall
    curves if `return_curves`) plus "detections" and "ground_truths", one per image.

    `mesh`: the one `predict` was made for (`make_predict_fn(mesh=...)`); every process
    reads every batch and its devices compute their slice. A batch's detections are fetched
    once the next batch is on its way, so the device never waits for the host's copy.
    """
    detections, ground_truths, in_flight = [], [], []
    for batch, truths in tqdm(loader, desc="eval", total=num_batches, leave=False,
                              disable=not is_main_process()):
        images = batch["image"] if mesh is None else shard_global_batch(batch["image"], mesh)
        in_flight.append((predict(params, rest, images), batch["valid"]))
        ground_truths += truths
        if len(in_flight) == 2:
            detections += unbatch_detections(*in_flight.pop(0))
    for outputs, valid in in_flight:
        detections += unbatch_detections(outputs, valid)
    result = evaluate_detections(detections, ground_truths, num_classes,
                                 use_07_metric=use_07_metric, return_curves=return_curves)
    return dict(result, detections=detections, ground_truths=ground_truths)


def evaluate_source(predict, params, rest, source, *, batch_size: int, max_boxes: int,
                    image_size: int, num_classes: int, resize: str = "uint8",
                    **options) -> dict:
    """`evaluate` over a data source, read by `pipeline.make_eval_loader` (ground truth padded
    to `max_boxes`, images resized to `image_size` by the resize mode `resize`); `options`
    are `evaluate`'s."""
    loader = pipeline.make_eval_loader(source, batch_size=batch_size, max_boxes=max_boxes,
                                       image_size=image_size, resize=resize)
    return evaluate(predict, params, rest, loader, num_classes,
                    num_batches=-(-len(source) // batch_size), **options)


def format_ap_table(result: dict, class_names) -> str:
    width = max(len(name) for name in class_names)
    rows = [f"{name:<{width}}  {ap:6.4f}" for name, ap in zip(class_names, result["ap"])]
    return "\n".join(rows + ["-" * (width + 8), f"{'mAP':<{width}}  {result['map']:6.4f}"])
