"""Equality with torchvision on the same weights: `python -m experiments.parity_torchvision`.

Needs torch, torchvision and scikit-image (the benchmark venv: experiments/benchmark.py's
"Reproduce"); none is a dependency of this project.

1. Builds torchvision's `ssd300_vgg16(weights=None, weights_backbone=None)` (91 COCO logits)
   with random weights, its classification head scaled (x0.5 by default) so that it gives
   confident, varied detections: scores from about 0.2 to 0.99 over a dozen or more labels
   per photo. (Much larger scales saturate many scores at exactly 1.0 in float32; the 200
   kept of those ties then depend on each implementation's sort order, not on the model.)
2. Saves its state dict with `torch.save` and converts it with `experiments.convert_ssd
   --format torchvision` (which reads the .pth without torch).
3. Runs torchvision's model (eval mode: its own resize, postprocess and NMS) and
   `Detector.from_checkpoint(OUT)`, with no arguments, on scikit-image's photographs (no
   download; several sizes and aspect ratios, grayscale ones as RGB).
4. A torchvision detection has a twin when ours has one of the same label, a score within
   1e-4 and every corner within 0.5 px of the original image (each of ours twins one of
   theirs at most). Prints a table; the target is >= 99% twinned.
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments import convert_ssd
from experiments.benchlib import print_table
from ssd_jax.detector import Detector, load_image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "camera", "coins",
          "immunohistochemistry")
SCORE_TOLERANCE = 1e-4
CORNER_TOLERANCE_PX = 0.5
TARGET = 0.99


def photographs(names=PHOTOS) -> dict[str, np.ndarray]:
    from skimage import data
    return {name: load_image(getattr(data, name)()) for name in names}


def torchvision_model(seed: int, class_scale: float, box_scale: float):
    """ssd300_vgg16 with random weights; the head convs' weights multiplied by the scales."""
    import torch
    from torchvision.models.detection import ssd300_vgg16

    torch.manual_seed(seed)
    model = ssd300_vgg16(weights=None, weights_backbone=None).eval()
    with torch.no_grad():
        for head, scale in ((model.head.classification_head, class_scale),
                            (model.head.regression_head, box_scale)):
            for conv in head.module_list:
                conv.weight.mul_(scale)
                conv.bias.normal_(0, 0.1 * scale)
    return model


def torchvision_detections(model, images: dict) -> dict[str, dict]:
    import torch
    with torch.no_grad():
        out = {}
        for name, image in images.items():
            tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
            (result,) = model([tensor])
            out[name] = {key: result[key].numpy() for key in ("boxes", "scores", "labels")}
    return out


def twins(theirs: dict, ours: dict) -> tuple[int, float, float]:
    """(how many of theirs have a twin among ours, largest score and corner difference over
    the twins). Greedy: each of theirs, best score first, takes the closest free twin."""
    free = np.ones(len(ours["scores"]), bool)
    matched, worst_score, worst_corner = 0, 0.0, 0.0
    for box, score, label in zip(theirs["boxes"], theirs["scores"], theirs["labels"]):
        corner = np.max(np.abs(ours["boxes"] - box), axis=1)
        score_diff = np.abs(ours["scores"] - score)
        ok = (free & (ours["labels"] == label) & (score_diff <= SCORE_TOLERANCE)
              & (corner <= CORNER_TOLERANCE_PX))
        if ok.any():
            best = np.flatnonzero(ok)[np.argmin(corner[ok])]
            free[best] = False
            matched += 1
            worst_score = max(worst_score, float(score_diff[best]))
            worst_corner = max(worst_corner, float(corner[best]))
    return matched, worst_score, worst_corner


def run(seed: int = 0, class_scale: float = 0.5, box_scale: float = 1.0) -> dict:
    import torch

    images = photographs()
    model = torchvision_model(seed, class_scale, box_scale)
    with tempfile.TemporaryDirectory() as folder:
        state = Path(folder) / "ssd300_vgg16_random.pth"
        torch.save(model.state_dict(), state)
        convert_ssd.main(["--format", "torchvision", str(state), str(Path(folder) / "out")])
        detector = Detector.from_checkpoint(Path(folder) / "out")
    start = time.perf_counter()
    theirs = torchvision_detections(model, images)
    their_seconds = time.perf_counter() - start
    detector(list(images.values())[:1])  # compiles
    start = time.perf_counter()
    ours = dict(zip(images, detector(list(images.values()))))
    our_seconds = time.perf_counter() - start
    rows = []
    for name, image in images.items():
        matched, score_diff, corner_diff = twins(theirs[name], ours[name])
        rows.append(dict(photo=name, size=f"{image.shape[1]}x{image.shape[0]}",
                         torchvision=len(theirs[name]["scores"]), ours=len(ours[name]["scores"]),
                         twinned=matched, score_diff=score_diff, corner_diff=corner_diff,
                         labels=len(set(theirs[name]["labels"].tolist())),
                         scores=_score_range(theirs[name]["scores"])))
    total = sum(r["torchvision"] for r in rows)
    twinned = sum(r["twinned"] for r in rows)
    return dict(rows=rows, total=total, twinned=twinned, fraction=twinned / max(total, 1),
                seed=seed, class_scale=class_scale, box_scale=box_scale,
                their_seconds=their_seconds, our_seconds=our_seconds,
                versions=f"torch {torch.__version__}, torchvision {_torchvision_version()}")


def _score_range(scores: np.ndarray) -> str:
    if len(scores) == 0:
        return "-"
    return f"{scores.min():.3f} / {np.median(scores):.3f} / {scores.max():.3f}"


def _torchvision_version() -> str:
    import torchvision
    return torchvision.__version__


def table_rows(result: dict) -> list[dict]:
    """One row per photo and a total, for `benchlib.print_table`."""
    rows = [{"photo": r["photo"], "size (WxH)": r["size"],
             "torchvision detections": r["torchvision"], "ours": r["ours"],
             "twinned": r["twinned"], "labels": r["labels"],
             "scores min / median / max": r["scores"],
             "max score diff": f"{r['score_diff']:.1e}",
             "max corner diff px": f"{r['corner_diff']:.1e}"} for r in result["rows"]]
    rows.append({"photo": "all", "size (WxH)": "", "torchvision detections": result["total"],
                 "ours": sum(r["ours"] for r in result["rows"]),
                 "twinned": f"{result['twinned']} ({100 * result['fraction']:.2f}%)",
                 "labels": "", "scores min / median / max": "",
                 "max score diff": f"{max(r['score_diff'] for r in result['rows']):.1e}",
                 "max corner diff px": f"{max(r['corner_diff'] for r in result['rows']):.1e}"})
    return rows


def section(quick: bool = False) -> tuple[list[dict], list[str]]:
    """experiments.benchmark's section: (rows, notes); n/a where torch is not installed."""
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
        import skimage  # noqa: F401
    except ImportError as error:
        return [{"photo": "n/a", "twinned": f"n/a ({error.name} not installed)"}], []
    result = run()
    return table_rows(result), [summary(result)]


def summary(result: dict) -> str:
    verdict = "meets" if result["fraction"] >= TARGET else "MISSES"
    return (f"{result['twinned']} of {result['total']} torchvision detections "
            f"({100 * result['fraction']:.2f}%) have a twin in ours (same label, score within "
            f"{SCORE_TOLERANCE:g}, corners within {CORNER_TOLERANCE_PX} px): {verdict} the "
            f"{100 * TARGET:.0f}% target. Random ssd300_vgg16 (seed {result['seed']}, class head "
            f"x{result['class_scale']:g}, box head x{result['box_scale']:g}), {result['versions']}; "
            f"{len(result['rows'])} photos in {result['their_seconds']:.1f} s (torchvision) and "
            f"{result['our_seconds']:.1f} s (ours, compiled), same CPU.")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class-scale", type=float, default=0.5,
                        help="factor on the random classification head (confident scores)")
    parser.add_argument("--box-scale", type=float, default=1.0,
                        help="factor on the random box regression head")
    args = parser.parse_args(argv)
    result = run(args.seed, args.class_scale, args.box_scale)
    print_table(table_rows(result))
    print()
    print(summary(result))
    return result


if __name__ == "__main__":
    main()
