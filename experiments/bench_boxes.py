"""Box-op speed: NumPy reference vs jitted JAX twin vs torchvision, in one run.

    python -m experiments.bench_boxes [--rounds 5] [--repeat 10] [--torch-threads N]

Times, on SSD300's 8732 priors:
  * IoU of the priors against 50 boxes ([8732, 50]);
  * training targets (matching + encoding) of a batch of 32 images with 1..50
    objects each, padded to 50 slots with a mask (`build_targets`), with each
    rule of matching's step 1: Caffe's bipartite one (the default) and the
    argmax shortcut (torchvision's SSDMatcher, which is timed in both rows);
  * `detect` on one image's raw outputs (20 classes; background dominates, a
    few confident objects are covered by clusters of priors, so NMS has real
    work), for a typical output and a dense one that fills every class's 400
    NMS candidates.

JAX numbers are steady state: compiled in the warmup calls, then timed until
`block_until_ready`. The torchvision column (when torch is importable; it is
never a dependency of this project) calls torchvision's own SSD pieces:
`ops.box_iou`; `SSDMatcher` + `BoxCoder(weights=(10, 10, 5, 5)).encode_single`
per image as in `SSD.forward`/`SSD.compute_loss`; `SSD.postprocess_detections`
itself for detection.

Timing: the implementations of a row take turns for `--rounds` rounds (so a
burst of load from other processes hits all of them), `--repeat` calls each per
round (one call of the slow reference); a time is the median over rounds of
each round's median call.

Threads: XLA's CPU backend uses every usable core; PyTorch gets the same count
(`torch.set_num_threads`) unless `--torch-threads` says otherwise; NumPy's
elementwise ops are single-threaded. Pin everything to fewer cores with
`taskset`: the usable core count follows the affinity mask.
"""
import argparse
import functools
import statistics
import types

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchlib import cpu_threads, machine_info, print_table, time_fn
from reference import boxes as reference_boxes
from reference import encoding as reference_encoding
from reference import matching as reference_matching
from reference import nms as reference_nms
from reference.loss import log_softmax
from reference.priors import SSD300, prior_boxes
from ssd_jax import boxes, matching, nms

try:
    import torch
    from torchvision.models.detection import _utils as torchvision_utils
    from torchvision.models.detection.ssd import SSD as TorchvisionSSD
    from torchvision.ops import boxes as torchvision_box_ops
except ImportError:
    torch = None

BATCH, GT_SLOTS, NUM_CLASSES = 32, 50, 20
NUM_OBJECTS = 10  # confident objects in the detection benchmark's image
# Background logit lead over the class logits (all N(0, 1) noise otherwise).
# 8: a class's score passes the 0.01 threshold on ~50-90 priors, as for a
# trained model; 4: on thousands, so every class fills its 400 NMS candidates.
TYPICAL_MARGIN, DENSE_MARGIN = 8.0, 4.0
SCORE_THRESHOLD, NMS_THRESHOLD, TOP_K, PRE_NMS_TOP_K = 0.01, 0.45, 200, 400


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="turns each implementation takes")
    parser.add_argument("--repeat", type=int, default=10,
                        help="timed JAX and torchvision calls per round")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="default: the usable core count, as XLA")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rows, notes = run(args.rounds, args.repeat, args.torch_threads, args.seed)
    print(machine_info())
    print(f"Threads: XLA CPU pool {cpu_threads()}, torch "
          f"{torch.get_num_threads() if torch is not None else 'n/a (not installed)'}, "
          "NumPy elementwise 1")
    print()
    print_table(rows)
    print()
    print("\n".join(notes))


def run(rounds: int = 5, repeat: int = 10, torch_threads: int | None = None,
        seed: int = 0) -> tuple[list[dict], list[str]]:
    """The table's rows, one per operation, and notes: the matching rules' time ratio and a
    line describing each detection workload."""
    if torch is not None:
        torch.set_num_threads(torch_threads or cpu_threads())
    rng = np.random.default_rng(seed)
    priors = prior_boxes(SSD300).astype(np.float32)
    rows = [_row("IoU [8732 x 50]", _time_in_turns(_iou_benchmark(rng, priors), rounds, repeat))]
    # Both rules' calls take turns in the same rounds, so their ratio is a paired one.
    targets = _time_in_turns(_targets_benchmark(rng, priors), rounds, repeat)
    for rule in reference_matching.RULES:
        times = {name: targets[rule, name] for name in ("reference", "jax")}
        if "torchvision" in targets:
            times["torchvision"] = targets["torchvision"]
        rows.append(_row(f"build_targets, {rule} (B={BATCH}, G={GT_SLOTS})", times))
    ratios = [b / a for b, a in zip(targets[("bipartite", "jax")], targets[("argmax", "jax")])]
    notes = [f"build_targets: the bipartite rule takes {statistics.median(ratios):.2f}x the "
             "argmax rule's time in JAX (median over rounds of the ratio within a round); "
             "torchvision's SSDMatcher is the argmax rule"]
    for name, margin in ("typical", TYPICAL_MARGIN), ("dense", DENSE_MARGIN):
        detect_fns, workload = _detect_benchmark(rng, priors, margin)
        rows.append(_row(f"detect, {name} (P={len(priors)}, C={NUM_CLASSES})",
                         _time_in_turns(detect_fns, rounds, repeat)))
        notes.append(f"detect, {name}: {workload}")
    return rows, notes


def _time_in_turns(fns, rounds, repeat_per_round):
    """{name: [each round's median seconds]} of callables that take turns, round by round.

    A name is 'reference', 'jax' or 'torchvision', or a (variant, such a name) pair;
    the reference, slow, is called once per round.
    """
    round_medians = {name: [] for name in fns}
    for turn in range(rounds):
        for name, fn in fns.items():
            reference = "reference" in (name if isinstance(name, tuple) else (name,))
            repeat = 1 if reference else repeat_per_round
            warmup = (1 if reference else 3) if turn == 0 else 0
            round_medians[name].append(time_fn(fn, warmup=warmup, repeat=repeat))
    return round_medians


def _row(operation, round_medians):
    """One table row from the round medians of 'reference', 'jax' and maybe 'torchvision'."""
    seconds = {name: statistics.median(times) for name, times in round_medians.items()}
    torchvision_s = seconds.get("torchvision")
    return {"operation": operation,
            "reference ms": f"{seconds['reference'] * 1e3:.3f}",
            "JAX ms": f"{seconds['jax'] * 1e3:.3f}",
            "torchvision ms": "n/a" if torchvision_s is None else f"{torchvision_s * 1e3:.3f}",
            "reference/JAX": f"{seconds['reference'] / seconds['jax']:.1f}x",
            "torchvision/JAX": ("n/a" if torchvision_s is None
                                else f"{torchvision_s / seconds['jax']:.2f}x")}


def _iou_benchmark(rng, priors):
    prior_corners = reference_boxes.center_to_corners(priors).astype(np.float32)
    others = _random_boxes(rng, (GT_SLOTS,))
    iou = jax.jit(boxes.iou)
    a, b = jnp.asarray(prior_corners), jnp.asarray(others)
    fns = {"reference": lambda: reference_boxes.iou(prior_corners, others),
           "jax": lambda: iou(a, b)}
    if torch is not None:
        a_t, b_t = torch.from_numpy(prior_corners), torch.from_numpy(others)
        fns["torchvision"] = lambda: torchvision_box_ops.box_iou(a_t, b_t)
    return fns


def _targets_benchmark(rng, priors):
    num_objects = rng.integers(1, GT_SLOTS + 1, BATCH)
    gt_mask = np.arange(GT_SLOTS) < num_objects[:, None]
    gt_boxes = np.where(gt_mask[..., None], _random_boxes(rng, (BATCH, GT_SLOTS)), 0.0)
    gt_labels = np.where(gt_mask, rng.integers(1, NUM_CLASSES + 1, (BATCH, GT_SLOTS)), 0)
    gt_boxes, gt_labels = gt_boxes.astype(np.float32), gt_labels.astype(np.int32)

    jax_args = [jnp.asarray(x) for x in (gt_boxes, gt_labels, gt_mask, priors)]
    fns = {}
    for rule in reference_matching.RULES:
        build_targets = jax.jit(functools.partial(matching.build_targets, rule=rule))
        fns[rule, "reference"] = functools.partial(reference_matching.build_targets, gt_boxes,
                                                   gt_labels, gt_mask, priors, rule=rule)
        fns[rule, "jax"] = functools.partial(build_targets, *jax_args)
    if torch is not None:
        # torchvision takes each image's real boxes, unpadded, and corner-form priors.
        images = [(torch.from_numpy(b[m]), torch.from_numpy(l[m]).long())
                  for b, l, m in zip(gt_boxes, gt_labels, gt_mask)]
        anchors = torch.from_numpy(reference_boxes.center_to_corners(priors).astype(np.float32))
        fns["torchvision"] = lambda: _torchvision_targets(images, anchors)
    return fns


def _torchvision_targets(images, anchors):
    """Per image, the target lines of torchvision's SSD.forward and SSD.compute_loss."""
    matcher = torchvision_utils.SSDMatcher(0.5)
    box_coder = torchvision_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    targets = []
    for gt_boxes, gt_labels in images:
        matched_idxs = matcher(torchvision_box_ops.box_iou(gt_boxes, anchors))
        foreground = torch.where(matched_idxs >= 0)[0]
        matched = matched_idxs[foreground]
        loc_target = box_coder.encode_single(gt_boxes[matched], anchors[foreground])
        labels = torch.zeros(len(anchors), dtype=gt_labels.dtype)
        labels[foreground] = gt_labels[matched]
        targets.append((loc_target, labels))
    return targets


def _detect_benchmark(rng, priors, background_margin):
    """Callables running detection on one synthetic SSD300 output, and a workload summary."""
    loc, logits = _ssd_outputs(rng, priors, background_margin)
    detect = jax.jit(nms.detect, static_argnames=("top_k", "pre_nms_top_k"))
    settings = dict(score_threshold=SCORE_THRESHOLD, iou_threshold=NMS_THRESHOLD, top_k=TOP_K,
                    pre_nms_top_k=PRE_NMS_TOP_K)
    jax_args = [jnp.asarray(x) for x in (loc, logits, priors)]
    fns = {"reference": lambda: reference_nms.detect(loc, logits, priors, **settings),
           "jax": lambda: detect(*jax_args, **settings)}

    probs = np.exp(log_softmax(logits.astype(np.float64)))
    candidates = np.minimum((probs[:, 1:] > SCORE_THRESHOLD).sum(0), PRE_NMS_TOP_K)
    counts = {"reference": len(reference_nms.detect(loc, logits, priors, **settings)[0]),
              "JAX": int(fns["jax"]()[3].sum())}
    if torch is not None:
        fns["torchvision"] = _torchvision_detect(loc, logits, priors)
        counts["torchvision"] = len(fns["torchvision"]()[0]["boxes"])
    workload = (f"{NUM_OBJECTS} confident objects; NMS candidates per class "
                f"(score > {SCORE_THRESHOLD}, at most {PRE_NMS_TOP_K}) min {candidates.min()}, "
                f"median {int(np.median(candidates))}, max {candidates.max()}, total "
                f"{candidates.sum()}; detections kept: "
                + ", ".join(f"{name} {k}" for name, k in counts.items()))
    return fns, workload


def _torchvision_detect(loc, logits, priors):
    """torchvision's own SSD.postprocess_detections on one image, as a no-argument callable.

    It is called on a stand-in for the model that holds only the settings the
    method reads, which spares building a backbone. Anchors are the priors in
    corner form, image size 1 x 1 since our boxes are normalized.
    """
    settings = types.SimpleNamespace(
        box_coder=torchvision_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)),
        score_thresh=SCORE_THRESHOLD, nms_thresh=NMS_THRESHOLD,
        topk_candidates=PRE_NMS_TOP_K, detections_per_img=TOP_K)
    head_outputs = {"bbox_regression": torch.from_numpy(loc)[None],
                    "cls_logits": torch.from_numpy(logits)[None]}
    anchors = [torch.from_numpy(reference_boxes.center_to_corners(priors).astype(np.float32))]
    return lambda: TorchvisionSSD.postprocess_detections(settings, head_outputs, anchors,
                                                         [(1, 1)])


def _ssd_outputs(rng, priors, background_margin):
    """(loc [P, 4], conf_logits [P, C + 1]) float32 resembling a trained SSD's raw output.

    Background dominates every prior; the priors overlapping one of a few
    objects by IoU > 0.5 are confident in its class and regress (noisily) to
    it, giving clusters of overlapping boxes for NMS to thin out.
    """
    num_priors = len(priors)
    loc = rng.normal(0.0, 0.5, (num_priors, 4))
    logits = rng.normal(0.0, 1.0, (num_priors, NUM_CLASSES + 1))
    logits[:, 0] += background_margin
    objects = _random_boxes(rng, (NUM_OBJECTS,))
    labels = rng.integers(1, NUM_CLASSES + 1, NUM_OBJECTS)
    overlaps = reference_boxes.iou(reference_boxes.center_to_corners(priors), objects)
    hit = overlaps.max(axis=1) > 0.5
    best = overlaps.argmax(axis=1)[hit]
    logits[hit, labels[best]] += background_margin + rng.uniform(1.0, 5.0, hit.sum())
    loc[hit] = (reference_encoding.encode(objects[best], priors[hit])
                + rng.normal(0.0, 0.3, (hit.sum(), 4)))
    return loc.astype(np.float32), logits.astype(np.float32)


def _random_boxes(rng, shape):
    """[*shape, 4] float32 corners with centers in [0.1, 0.9] and sides up to 0.6, clipped."""
    centers = rng.uniform(0.1, 0.9, (*shape, 2))
    half_sides = rng.uniform(0.025, 0.3, (*shape, 2))
    corners = np.concatenate([centers - half_sides, centers + half_sides], axis=-1)
    return np.clip(corners, 0.0, 1.0).astype(np.float32)


if __name__ == "__main__":
    main()
