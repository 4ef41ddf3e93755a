"""Evaluate a trained SSD: `python -m experiments.eval_voc --checkpoint DIR [--dataset shapes]`.

Prints the per-class AP table and mAP (VOC2007 11-point metric by default).
"""
import argparse
import sys

from flax import nnx

from reference.priors import prior_boxes
from ssd_jax import inference
from ssd_jax.data import pipeline
from ssd_jax.data.sources import DATASETS, DatasetUnavailableError, get_sources
from ssd_jax.train import load_trained_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="a training run's checkpoints/ folder (or the run folder)")
    parser.add_argument("--dataset", choices=DATASETS, default="voc")
    parser.add_argument("--data-dir", default="", help="VOCdevkit folder or TFDS data dir")
    parser.add_argument("--step", type=int, default=None, help="default: the latest")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-examples", type=int, default=0)
    parser.add_argument("--area-metric", action="store_true",
                        help="VOC2010+ area under the PR curve instead of VOC2007 11-point")
    args = parser.parse_args(argv)

    try:
        model, meta = load_trained_model(args.checkpoint, args.step)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    image_size = model.config.priors.image_size
    try:
        _, source, _ = get_sources(args.dataset, image_size=image_size,
                                   eval_examples=args.eval_examples, data_dir=args.data_dir)
    except DatasetUnavailableError as error:
        sys.exit(f"error: {error}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    predict = inference.make_predict_fn(graphdef, prior_boxes(model.config.priors))
    loader = pipeline.make_eval_loader(source, batch_size=args.batch_size,
                                       max_boxes=meta["train"]["max_boxes"], image_size=image_size)
    result = inference.evaluate(predict, params, rest, loader, len(meta["class_names"]),
                                use_07_metric=not args.area_metric,
                                num_batches=-(-len(source) // args.batch_size))
    print(inference.format_ap_table(result, meta["class_names"]))


if __name__ == "__main__":
    main()
