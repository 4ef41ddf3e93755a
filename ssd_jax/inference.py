"""Batched inference: the forward pass and fixed-size postprocessing compiled as one
function, and VOC evaluation of a model over a data source."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from reference.voc_eval import evaluate_detections
from ssd_jax.nms import detect


def make_predict_fn(graphdef, priors, *, score_threshold=0.01, iou_threshold=0.45, top_k=200):
    """Returns jitted `predict(params, rest, images[B,S,S,3]) -> dict` of
    boxes [B,K,4] (normalized corners), scores [B,K], labels [B,K], valid [B,K]."""
    priors = jnp.asarray(priors)

    def detect_one(loc, conf_logits):
        return detect(loc, conf_logits, priors, score_threshold=score_threshold,
                      iou_threshold=iou_threshold, top_k=top_k)

    @jax.jit
    def predict(params, rest, images):
        loc, conf_logits = nnx.merge(graphdef, params, rest)(images)
        boxes, scores, labels, valid = jax.vmap(detect_one)(loc, conf_logits)
        return dict(boxes=boxes, scores=scores, labels=labels, valid=valid)

    return predict


def unbatch_detections(outputs: dict, keep=None) -> list[dict]:
    """Splits a host copy of `predict`'s output into one dict per image, dropping the
    padding (invalid detections, and images whose `keep` flag is False)."""
    outputs = jax.device_get(outputs)
    keep = np.ones(len(outputs["valid"]), bool) if keep is None else keep
    return [{key: outputs[key][i][outputs["valid"][i]] for key in ("boxes", "scores", "labels")}
            for i in np.flatnonzero(keep)]


def evaluate(predict, params, rest, loader, num_classes: int, *, use_07_metric=True,
             return_curves=False, num_batches=None) -> dict:
    """VOC evaluation (reference.voc_eval) of `predict` over an eval loader yielding
    (batch, ground_truths); returns evaluate_detections' dict (with the precision/recall
    curves if `return_curves`) plus "detections" and "ground_truths", one per image."""
    detections, ground_truths = [], []
    for batch, truths in tqdm(loader, desc="eval", total=num_batches, leave=False):
        detections += unbatch_detections(predict(params, rest, batch["image"]), batch["valid"])
        ground_truths += truths
    result = evaluate_detections(detections, ground_truths, num_classes,
                                 use_07_metric=use_07_metric, return_curves=return_curves)
    return dict(result, detections=detections, ground_truths=ground_truths)


def format_ap_table(result: dict, class_names) -> str:
    width = max(len(name) for name in class_names)
    rows = [f"{name:<{width}}  {ap:6.4f}" for name, ap in zip(class_names, result["ap"])]
    return "\n".join(rows + ["-" * (width + 8), f"{'mAP':<{width}}  {result['map']:6.4f}"])
