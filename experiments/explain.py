"""Pictures of SSD's box algorithms: `python -m experiments.explain --out DIR`.

Every picture draws what a `reference/` function returns for one image of the built-in shapes
data, rendered at SSD300's 300 x 300 input and seen through SSD300's 8732 default boxes, so the
picture is the algorithm:

  default_boxes.png  priors.prior_boxes, priors.cell_boxes: one cell's boxes on each of the six
                     feature maps (38x38 ... 1x1)
  matching.png       matching.match: the priors each ground truth box claims, by either rule
  encoding.png       encoding.encode / encoding.decode: regression targets, and decoded back
  nms.png            nms.nms: overlapping detections before and after suppression

No checkpoint and no download needed. Also writes README_snippet.md (and prints it): the
pictures with captions, for README.md, which shows the copies committed in docs/img/
(regenerate them with `python -m experiments.explain --out docs/img`).
"""
import argparse
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from reference.boxes import center_to_corners, iou  # noqa: E402
from reference.encoding import decode, encode  # noqa: E402
from reference.matching import claim_priors, match  # noqa: E402
from reference.nms import nms  # noqa: E402
from reference.priors import SSD300, cell_boxes, prior_boxes  # noqa: E402
from ssd_jax.data.shapes import CLASS_NAMES, ShapesDataset  # noqa: E402

SIZE = SSD300.image_size
PRIORS_PER_MAP = [f * f * n for f, n in zip(SSD300.feature_map_sizes, SSD300.boxes_per_location)]
GT_COLOURS = ("#e6194b", "#4363d8", "#f58231", "#911eb4", "#3cb44b", "#000075")
MATCH_THRESHOLD = 0.5  # the paper's
NMS_THRESHOLD = 0.45   # the paper's, at inference
# A thin box (8 x 99 px) no SSD300 prior overlaps by 0.5, in an empty spot of the default image.
SLIVER = np.array([[0.86, 0.55, 0.887, 0.88]])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs")
    parser.add_argument("--index", type=int, default=10,
                        help="which validation image of the shapes data to draw on")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    example = ShapesDataset("validation", image_size=SIZE, max_objects=4)[args.index]
    priors = prior_boxes(SSD300)
    snippet = ["## How SSD sees an image", "",
               "Drawn by `python -m experiments.explain --out docs/img` from what the `reference/` "
               "functions return, on a 300 x 300 shapes image with SSD300's 8732 default boxes.",
               ""]
    for name, (draw, caption) in FIGURES.items():
        path = args.out / f"{name}.png"
        save_small_png(draw(example, priors), path)
        print(f"wrote {path}")
        snippet += [f"![{name}](docs/img/{name}.png)", "", caption, ""]
    (args.out / "README_snippet.md").write_text("\n".join(snippet))
    print(f"wrote {args.out / 'README_snippet.md'}:\n")
    print("\n".join(snippet))


def draw_default_boxes(example, priors):
    """One cell's default boxes on each SSD300 map: the cell that holds the first object's
    centre, with its boxes sliced out of `prior_boxes` and their shapes from `cell_boxes`."""
    centre = (example["boxes"][0, :2] + example["boxes"][0, 2:]) / 2
    name = CLASS_NAMES[example["labels"][0] - 1]
    fig, axes = plt.subplots(2, 3, figsize=(10, 7.6))
    first_of_map = np.cumsum([0] + PRIORS_PER_MAP)
    for k, ax in enumerate(axes.flat):
        f, n, step = SSD300.feature_map_sizes[k], SSD300.boxes_per_location[k], SSD300.steps[k]
        row, col = (min(int(c * SIZE / step), f - 1) for c in centre[::-1])
        first = first_of_map[k] + (row * f + col) * n  # prior order: map, row, column, box
        show_image(ax, example["image"], margin=45)
        for line in np.arange(f + 1) * step:
            ax.plot([line, line], [0, SIZE], color="white", lw=0.4, alpha=0.6)
            ax.plot([0, SIZE], [line, line], color="white", lw=0.4, alpha=0.6)
        ax.add_patch(Rectangle((col * step, row * step), step, step, facecolor="yellow",
                               alpha=0.3, edgecolor="yellow", lw=2))
        for box, (w, h), colour in zip(priors[first:first + n], cell_boxes(SSD300, k), GT_COLOURS):
            draw_box(ax, center_to_corners(box) * SIZE, colour, lw=1.8,
                     label=f"{w * SIZE:.0f} x {h * SIZE:.0f} px")
        s_k = SSD300.min_sizes[k] / SIZE
        ax.set_title(f"{f}x{f} map (step {step} px), s_k = {s_k:.2f}", fontsize=10)
        ax.legend(fontsize=7, loc="lower left", framealpha=0.85, handlelength=1)
    fig.suptitle(f"The default boxes of the cell holding the {name}'s centre, on each map.\n"
                 "Per cell: ratio 1 at scale s_k and at sqrt(s_k s_k+1), then ratios 2, 1/2 "
                 "(and 3, 1/3); boxes may cross the image border", fontsize=11)
    fig.tight_layout()
    return fig


def draw_matching(example, priors):
    """`match` with SSD300's priors: the prior each gt claims (step 1, Caffe's bipartite rule:
    the best one still free, however low its IoU) and the priors with IoU >= 0.5 (step 2), and
    how many priors each map contributes. Every shapes object has a prior with IoU >= 0.5, so a
    made-up sliver joins them to show step 1's use."""
    gt_boxes = np.concatenate([example["boxes"], SLIVER])
    gt_labels = np.append(example["labels"], 1)
    names = [CLASS_NAMES[label - 1] for label in example["labels"]] + ["made-up sliver"]
    matched_boxes, labels = match(gt_boxes, gt_labels, priors, MATCH_THRESHOLD)
    owner = matched_gt(matched_boxes, labels, gt_boxes)
    overlaps = iou(gt_boxes, center_to_corners(priors))
    claimed_by = claim_priors(overlaps)  # step 1; each gt here overlaps some prior
    best_prior = np.array([np.flatnonzero(claimed_by == g)[0] for g in range(len(gt_boxes))])
    map_of_prior = np.repeat(np.arange(len(PRIORS_PER_MAP)), PRIORS_PER_MAP)
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(11, 5.2), width_ratios=(1, 1.1))
    show_image(ax, example["image"], margin=10)
    width = 0.8 / len(gt_boxes)
    for g, (box, name, colour) in enumerate(zip(gt_boxes, names, GT_COLOURS)):
        for p in np.flatnonzero((owner == g) & (np.arange(len(priors)) != best_prior[g])):
            draw_box(ax, center_to_corners(priors[p]) * SIZE, colour, lw=0.8, ls="--", alpha=0.8)
        draw_box(ax, center_to_corners(priors[best_prior[g]]) * SIZE, colour, lw=2.5, ls=":")
        draw_box(ax, box * SIZE, colour, lw=3)
        counts = np.bincount(map_of_prior[owner == g], minlength=len(PRIORS_PER_MAP))
        bars.bar(np.arange(len(counts)) + (g - (len(gt_boxes) - 1) / 2) * width, counts, width,
                 color=colour, label=f"{name}: {counts.sum()} priors, own prior IoU "
                                     f"{overlaps[g, best_prior[g]]:.2f}")
    ax.legend(handles=[Line2D([], [], color="k", lw=3, label="ground truth"),
                       Line2D([], [], color="k", lw=2.5, ls=":", label="its own prior (step 1)"),
                       Line2D([], [], color="k", lw=0.8, ls="--", label="IoU >= 0.5 (step 2)")],
              fontsize=8, loc="lower left", framealpha=0.85)
    ax.set_title(f"match(): {int((labels > 0).sum())} of {len(priors)} priors are positive",
                 fontsize=10)
    bars.set_xticks(range(len(SSD300.feature_map_sizes)),
                    [f"{f}x{f}" for f in SSD300.feature_map_sizes])
    bars.set_xlabel("feature map")
    bars.set_ylabel("matched priors")
    bars.set_title("Objects match on the maps of their scale; the sliver, which no prior\n"
                   "overlaps by 0.5, gets only its own prior (step 1)", fontsize=10)
    bars.legend(fontsize=8)
    fig.tight_layout()
    return fig


def draw_encoding(example, priors):
    """`encode` turns each positive prior's gt into offsets; `decode` turns them back into
    the gt box exactly. The image shows the first object's priors, the plots every object's."""
    gt_boxes = example["boxes"]
    matched_boxes, labels = match(gt_boxes, example["labels"], priors, MATCH_THRESHOLD)
    positive = labels > 0
    owner = matched_gt(matched_boxes, labels, gt_boxes)
    offsets = encode(matched_boxes, priors)
    decoded = decode(offsets, priors)
    error = np.abs(decoded[positive] - matched_boxes[positive]).max() * SIZE
    fig, (ax, centre, size) = plt.subplots(1, 3, figsize=(13, 4.6), width_ratios=(1.1, 1, 1))
    show_image(ax, example["image"], margin=10)
    draw_box(ax, gt_boxes[0] * SIZE, GT_COLOURS[0], lw=7, alpha=0.4)
    for p in np.flatnonzero(owner == 0):
        draw_box(ax, center_to_corners(priors[p]) * SIZE, "white", lw=0.8, ls="--")
        draw_box(ax, decoded[p] * SIZE, GT_COLOURS[0], lw=1)
    for g, colour in enumerate(GT_COLOURS[:len(gt_boxes)]):
        name = CLASS_NAMES[example["labels"][g] - 1]
        centre.scatter(*offsets[owner == g, :2].T, s=14, color=colour, label=name)
        size.scatter(*offsets[owner == g, 2:].T, s=14, color=colour, label=name)
    ax.set_title(f"{int((owner == 0).sum())} priors (dashed) of the "
                 f"{CLASS_NAMES[example['labels'][0] - 1]}: decode(encode(gt))\n(thin) lies on "
                 f"the gt (wide); largest error {error:.1g} px", fontsize=10)
    for panel, (x, y), title in [(centre, ("t_cx", "t_cy"), "centre offsets / (0.1 prior size)"),
                                 (size, ("t_w", "t_h"), "log size ratios / 0.2")]:
        panel.axhline(0, color="grey", lw=0.5)
        panel.axvline(0, color="grey", lw=0.5)
        panel.set_xlabel(x)
        panel.set_ylabel(y)
        panel.set_title(f"encode() of every positive prior:\n{title}", fontsize=10)
        panel.legend(fontsize=8)
    fig.tight_layout()
    return fig


def draw_nms(example, priors):
    """`nms` per class, as at inference, on jittered copies of the gt boxes with random
    scores; `priors` is unused, the detections are made up."""
    rng = np.random.default_rng(0)
    gt_boxes, gt_labels = example["boxes"], example["labels"]
    copies = 8
    sides = np.tile(gt_boxes[:, 2:] - gt_boxes[:, :2], 2)
    jitter = rng.normal(0, 0.08, (len(gt_boxes) * copies, 4)) * np.repeat(sides, copies, axis=0)
    boxes = np.clip(np.repeat(gt_boxes, copies, axis=0) + jitter, 0, 1)  # clipped, as by detect
    scores = rng.uniform(0.2, 0.95, len(boxes))
    classes = np.repeat(gt_labels, copies)
    kept = np.concatenate([np.flatnonzero(classes == c)[nms(boxes[classes == c],
                                                            scores[classes == c], NMS_THRESHOLD)]
                           for c in np.unique(classes)])
    colours = np.repeat(np.arange(len(gt_boxes)), copies)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))
    for ax, shown, title in [(axes[0], np.arange(len(boxes)), f"{len(boxes)} detections"),
                             (axes[1], kept, f"after nms(..., {NMS_THRESHOLD}) per class: "
                                             f"{len(kept)} kept")]:
        show_image(ax, example["image"], margin=20)
        for i in shown[np.argsort(scores[shown])]:
            draw_box(ax, boxes[i] * SIZE, GT_COLOURS[colours[i]], lw=0.5 + 2 * scores[i])
            if shown is kept:
                ax.text(boxes[i, 0] * SIZE, boxes[i, 1] * SIZE, f"{scores[i]:.2f}", fontsize=8,
                        va="bottom", color="white", backgroundcolor=GT_COLOURS[colours[i]])
        ax.set_title(title, fontsize=10)
    fig.suptitle("Greedy NMS: highest score first, drop boxes with IoU > 0.45 with a kept one "
                 "(line width ~ score)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def matched_gt(matched_boxes, labels, gt_boxes):
    """[P] index of the gt each prior matched (match returns that gt's box), -1 for background."""
    same = np.all(matched_boxes[:, None, :] == gt_boxes[None, :, :].astype(np.float64), axis=-1)
    return np.where(labels > 0, same.argmax(axis=1), -1)


def show_image(ax, image, margin):
    """The image on its 0..SIZE pixel axes, with `margin` pixels of room around it."""
    ax.imshow(image, extent=(0, SIZE, SIZE, 0))
    ax.add_patch(Rectangle((0, 0), SIZE, SIZE, fill=False, color="black", lw=1))
    ax.set_xlim(-margin, SIZE + margin)
    ax.set_ylim(SIZE + margin, -margin)
    ax.set_facecolor("#eeeeee")
    ax.set_xticks([])
    ax.set_yticks([])


def draw_box(ax, corners, colour, **line):
    xmin, ymin, xmax, ymax = corners
    ax.add_patch(Rectangle((xmin, ymin), xmax - xmin, ymax - ymin, fill=False, color=colour,
                           **line))


def save_small_png(fig, path, dpi=80):
    """Saves with a 256-colour palette: a fraction of the size of a full-colour PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)


FIGURES = {
    "default_boxes": (draw_default_boxes, "Default boxes (`reference.priors.prior_boxes`, "
                      "`cell_boxes`): every cell of each of SSD300's six feature maps gets 4 or 6 "
                      "boxes of one scale s_k and several aspect ratios; coarser maps hold larger "
                      "boxes."),
    "matching": (draw_matching, "Matching (`reference.matching.match`): each ground-truth box "
                 "claims a prior of its own, the best one still free (step 1, Caffe's greedy "
                 "bipartite rule, even when the overlap is low), then every prior with IoU >= "
                 "0.5 joins its best gt (step 2). Objects are matched on the maps of their "
                 "scale; a made-up 8 x 99 px sliver, which no prior overlaps by 0.5, gets only "
                 "its own prior."),
    "encoding": (draw_encoding, "Encoding (`reference.encoding.encode`, `decode`): a matched "
                 "prior's target is the offset of its gt box (paper eq. 2, divided by the "
                 "variances 0.1 and 0.2); decoding the offsets gives back the gt box exactly."),
    "nms": (draw_nms, "Non-maximum suppression (`reference.nms.nms`): per class, the highest "
            "scored box is kept and boxes overlapping it by IoU > 0.45 are dropped."),
}


if __name__ == "__main__":
    main()
