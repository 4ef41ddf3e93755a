"""A COCO-format folder drawn from the shapes generator, holding what real exports hold:
`python -m ssd_jax.data.shapes_coco DIR [--train-images N] [--val-images N] [--image-size S]`.

Writes DIR/annotations/instances_train2017.json and instances_val2017.json, the images in
DIR/train2017/ and DIR/val2017/, with
- category ids that are neither 1..C nor listed in order (CATEGORY_IDS, listed shuffled),
- image ids that are not 0..N-1,
- images of two sizes (every third one stretched to 1.5 times the width), JPEG and, every
  seventh, PNG,
- one image per split without annotations (background only),
- crowd regions (`iscrowd` 1: every fifth image with several objects has its last one marked
  crowd),
- float boxes, those touching the border drawn 2.5 px past it (clipping gives the exact box
  back), and one degenerate (zero-width) box in the first image, which the reader drops.
"""
import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ssd_jax.data import shapes

CATEGORY_IDS = (17, 3, 42, 8, 25, 11)  # one per shapes class, in shapes.CLASS_NAMES order
IMAGE_ID_START, IMAGE_ID_STEP = 1000, 7
SPLITS = {"train2017": "train", "val2017": "validation"}
BORDER_OVERSHOOT = 2.5  # px a box touching the border reaches past it


def _image_entry(index: int, split: str, size: tuple[int, int]) -> dict:
    image_id = IMAGE_ID_START + IMAGE_ID_STEP * index
    suffix = "png" if index % 7 == 3 else "jpg"
    return {"id": image_id, "file_name": f"{split}_{image_id:06d}.{suffix}",
            "width": size[0], "height": size[1]}


def _box_annotation(box, width: int, height: int, category_id: int, image_id: int,
                    crowd: bool) -> dict:
    """Normalized corners -> COCO's pixel [x, y, w, h], overshooting the border it touches."""
    xmin, ymin, xmax, ymax = np.asarray(box, np.float64) * [width, height, width, height]
    xmin, ymin = (v - BORDER_OVERSHOOT if v <= 0 else v for v in (xmin, ymin))
    xmax = xmax + BORDER_OVERSHOOT if xmax >= width else xmax
    ymax = ymax + BORDER_OVERSHOOT if ymax >= height else ymax
    return {"image_id": image_id, "category_id": category_id, "iscrowd": int(crowd),
            "bbox": [round(float(v), 2) for v in (xmin, ymin, xmax - xmin, ymax - ymin)]}


def write_split(root: Path, split: str, num_images: int, image_size: int, seed: int) -> Path:
    """Writes one split (see the module docstring); returns its annotation file."""
    generator = shapes.ShapesDataset(SPLITS[split], num_examples=num_images,
                                     image_size=image_size, max_objects=4, seed=seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    empty_index = num_images - 1  # the last image: background only
    for index in range(num_images):
        if index == empty_index:
            rng = np.random.default_rng((seed, 99, index))
            example = {"image": shapes._background(rng, image_size).astype(np.uint8),
                       "boxes": np.zeros((0, 4)), "labels": np.zeros(0, int)}
        else:
            example = generator[index]
        pixels = Image.fromarray(example["image"])
        if index % 3 == 2:
            pixels = pixels.resize((image_size * 3 // 2, image_size), Image.BILINEAR)
        entry = _image_entry(index, split, pixels.size)
        pixels.save(root / split / entry["file_name"], quality=95)
        images.append(entry)
        count = len(example["labels"])
        for number, (box, label) in enumerate(zip(example["boxes"], example["labels"])):
            crowd = index % 5 == 4 and count > 1 and number == count - 1
            annotations.append(_box_annotation(box, *pixels.size, CATEGORY_IDS[label - 1],
                                               entry["id"], crowd))
        if index == 0:
            annotations.append({"image_id": entry["id"], "category_id": CATEGORY_IDS[0],
                                "iscrowd": 0, "bbox": [10.0, 10.0, 0.0, 5.0]})
    for number, annotation in enumerate(annotations, 1):
        annotation["id"] = number
    # Listed out of id order, as exports may list them.
    order = [4, 1, 5, 0, 3, 2]
    categories = [{"id": CATEGORY_IDS[i], "name": shapes.CLASS_NAMES[i], "supercategory": "shape"}
                  for i in order]
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    return path


def write_shapes_coco(root, *, train_images: int = 400, val_images: int = 100,
                      image_size: int = 128, seed: int = 0) -> Path:
    """Writes the COCO-format shapes folder `root` (see the module docstring); returns it."""
    root = Path(root)
    for split, count in (("train2017", train_images), ("val2017", val_images)):
        if count < 2:
            raise ValueError(f"{split} needs at least 2 images (one is left empty), got {count}")
        write_split(root, split, count, image_size, seed)
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write")
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--val-images", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_shapes_coco(args.out, train_images=args.train_images, val_images=args.val_images,
                      image_size=args.image_size, seed=args.seed)
    print(f"wrote {args.out}/annotations/instances_{{train2017,val2017}}.json, "
          f"{args.out}/train2017/, {args.out}/val2017/")


if __name__ == "__main__":
    main()
