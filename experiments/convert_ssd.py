"""Convert a peer's trained SSD to an ssd_jax checkpoint:
`python -m experiments.convert_ssd --format {torchvision,ssd.pytorch,lufficc,mmdet} SRC OUT`.

SRC is the peer's published .pth (read without PyTorch) or an .npz of its state dict; OUT is a
new checkpoint folder for `Detector.from_checkpoint(OUT)`, `ssd-jax detect --checkpoint OUT`,
`experiments.eval_voc --checkpoint OUT` and training's initialization. OUT records the peer's
model geometry, pixel statistics, classes, label ids and inference settings (resize, caps,
clipping), so the converted detector gives the peer's own detections. See
`ssd_jax.convert.convert_detector` and README's "Pretrained detectors".
"""
import argparse
import sys

from ssd_jax.convert import PEER_FORMATS, convert_detector_file


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=PEER_FORMATS,
                        help="whose checkpoint SRC is")
    parser.add_argument("source", metavar="SRC", help="the peer's .pth, or an .npz of it")
    parser.add_argument("output", metavar="OUT", help="checkpoint folder to write (new)")
    args = parser.parse_args(argv)
    try:
        meta = convert_detector_file(args.format, args.source, args.output)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    model, settings = meta["model"], meta["inference"]
    print(f"{args.source} ({args.format}) -> {args.output}: {model['name']}, "
          f"{model['num_classes']} classes, priors clip {model['priors']['clip']!r}, "
          f"pixel_mean {tuple(round(m, 3) for m in model['pixel_mean'])}; inference {settings}")
    return meta


if __name__ == "__main__":
    main()
