"""SSD's training-time data augmentation, SSD paper section 2.2, "Data augmentation", and
section 3.6, "Data augmentation for small object accuracy".

Every training image goes through these steps, in this order, the order of the Caffe release
(weiliu89/caffe, `AnnotatedDataLayer`: DistortImage, ExpandImage, batch samplers, then crop, resize
and mirror) and of ssd.pytorch (`SSDAugmentation` in utils/augmentations.py):

  1. photometric distortions "similar to those described in [Howard]": brightness, contrast,
     saturation, hue and channel order, each applied with probability 1/2 (`photometric_distort`);
  2. zoom out: "randomly place an image on a canvas of 16x of the original image size filled with
     mean values" (up to 4x each side), which makes small training objects (`expand`);
  3. a random patch: "use the entire original input image; sample a patch so that the minimum
     jaccard overlap with the objects is 0.1, 0.3, 0.5, 0.7, or 0.9; randomly sample a patch",
     keeping the objects whose centre lies in the patch (`random_crop`);
  4. horizontal flip with probability 1/2 (`random_flip`);
  5. resize to the network's input size (`resize`): bilinear with half-pixel centres and no
     antialiasing, OpenCV's INTER_LINEAR, which both releases use.

Mean/std normalization is left to the model (`ssd_jax.model.ModelConfig.pixel_mean`): the output
image is uint8. `ssd_train_transform` composes the steps into a `transform` for
`ssd_jax.data.pipeline.make_train_loader`. This module is written to be read, step by step on
whole images; `ssd_jax.data.augment` is its fast twin (same output, bit for bit), and
`ssd_jax.data.resize` holds the fast resize that training, evaluation and the detector use.

Images are uint8 [H, W, 3] RGB. Boxes are [G, 4] corners (xmin, ymin, xmax, ymax) normalized to
[0, 1] by the width and height of the image they belong to, so each geometric step returns them
normalized to its own output image. Every random step takes an explicit `np.random.Generator`
and is split into a `sample_*` function, the random choice, and one that applies it, so
`ssd_jax.data.augment` can make every choice before touching pixels. The crop, the one step that
drops objects, returns the indices of those it keeps: labels, difficult flags and any other
per-object field follow them.

Where the public implementations disagree, we choose:
  * Patch constraint: a patch qualifies if at least ONE object has IoU >= the minimum, as the
    Caffe release's `SatisfySampleConstraint` (src/caffe/util/sampler.cpp) does. ssd.pytorch meant
    every object (`overlap.min() < min_iou`), but its test `... and max_iou < overlap.max()` with
    max_iou = inf never rejects a patch (amdegroot/ssd.pytorch#68, #119). As in ssd.pytorch, the
    patch must also contain the centre of at least one object, so it has ground truth.
  * Patch shape and choice, after ssd.pytorch's `RandomSampleCrop`: width and height uniform in
    [0.3, 1] of the image's (the paper says [0.1, 1]; both releases use 0.3), pixel aspect ratio
    in [1/2, 2], 50 trials, the choice among the seven options uniform, a new choice when all 50
    trials fail. Caffe instead draws a scale and an aspect ratio, runs every sampler and picks
    uniformly among those that succeeded.
  * Hue: +-18 degrees, as in ssd.pytorch (OpenCV float HSV, hue in degrees). Caffe's hue_delta 18
    is in OpenCV's uint8 units of 2 degrees, i.e. +-36 degrees.
  * Values are clipped to [0, 255] (saturation to [0, 1]) after every photometric step, as
    Caffe's saturating uint8 arithmetic does; ssd.pytorch's float pipeline lets them overflow.
  * Channel swap with probability 1/2, as ssd.pytorch's `RandomLightingNoise`; Caffe's
    ssd_pascal.py sets random_order_prob to 0.
  * Resize: one interpolation, bilinear, where Caffe draws one of five per image.
"""
import functools
from typing import NamedTuple

import numpy as np

from reference.boxes import iou
from reference.validation import check_boxes, check_positive_int

# The fill colour of the zoom-out canvas: Caffe's VOC mean (104, 117, 123) BGR as RGB. Training
# should pass the model's own pixel mean, so the fill normalizes to about zero.
MEAN_RGB = (123.0, 117.0, 104.0)

STEP_PROB = 0.5                   # each photometric step, the zoom out and the flip
BRIGHTNESS_DELTA = 32.0           # added to every channel, uniform in [-delta, delta]
CONTRAST_RANGE = (0.5, 1.5)       # factor on every channel
SATURATION_RANGE = (0.5, 1.5)     # factor on HSV saturation
HUE_DELTA = 18.0                  # degrees added to HSV hue, uniform in [-delta, delta]
MAX_EXPAND_RATIO = 4.0            # canvas side / image side, uniform in [1, 4]
# Minimum IoU of a patch with some object: None keeps the whole image; 0.0 is "randomly sample a
# patch", since any patch has IoU >= 0 with an object.
MIN_IOU_CHOICES = (None, 0.1, 0.3, 0.5, 0.7, 0.9, 0.0)
PATCH_SIDE_RANGE = (0.3, 1.0)     # patch width (height) / image width (height)
PATCH_ASPECT_RANGE = (0.5, 2.0)   # patch height / width, in pixels
PATCH_TRIALS = 50


def split_rng(rng: np.random.Generator, count: int) -> list[np.random.Generator]:
    """`count` independent generators seeded from `rng`. Each step of `ssd_train_transform` draws
    from its own, so a faster composition may run the steps in another order (or skip the pixels
    a later step throws away) and still make the same random choices."""
    return [np.random.default_rng(seed) for seed in rng.integers(2**63, size=count)]


# --- Photometric distortions. ---
# They work on float32 channel planes [3, H, W] (red, green, blue) with values in [0, 255].

def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[3, ...] float planes R, G, B in [0, 255] -> planes (hue, saturation, value): hue in
    degrees [0, 360], saturation in [0, 1], value in [0, 255] (OpenCV's float convention, which
    ssd.pytorch uses). Grey has hue 0 and saturation 0."""
    red, green, blue = rgb
    value = np.maximum(np.maximum(red, green), blue)
    chroma = value - np.minimum(np.minimum(red, green), blue)
    # The largest channel (red first on ties) picks a third of the colour wheel, the other two
    # the place in it, in sixths of the wheel: red at 0, green at 2, blue at 4.
    offset = np.where(value == red, green - blue,
                      np.where(value == green, 2 * chroma + blue - red, 4 * chroma + red - green))
    sixths = offset / np.where(chroma == 0, 1, chroma)
    sixths = np.where(sixths < 0, sixths + 6, sixths)   # [-1, 5) -> [0, 6]
    return 60 * sixths, chroma / np.where(value == 0, 1, value), value


def wrap_hue(hue: np.ndarray) -> np.ndarray:
    """Hue in degrees in [-360, 720) -> the same angle in [0, 360]."""
    return np.where(hue < 0, hue + 360, np.where(hue >= 360, hue - 360, hue)).astype(hue.dtype)


def hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Planes hue (degrees in [0, 360]), saturation in [0, 1], value -> [3, ...] planes R, G, B;
    the inverse of `rgb_to_hsv`."""
    chroma = value * saturation
    sixths = hue / 60
    # Channel red (green, blue) sits at hue 0 (120, 240): it equals the value within 60 degrees
    # of there, drops linearly to value - chroma over the next 60 and stays there (Wikipedia's
    # "HSV to RGB alternative": k = (n + hue / 60) mod 6 for n = 5, 3, 1).
    channels = []
    for n in (5, 3, 1):
        k = sixths + n
        k = np.where(k >= 6, k - 6, k)   # mod 6, for k in [1, 12)
        channels.append(value - chroma * np.clip(np.minimum(k, 4 - k), 0, 1))
    return np.stack(channels)


def adjust_brightness(pixels: np.ndarray, delta: float) -> np.ndarray:
    """Adds `delta` to every channel, clipped to [0, 255]. pixels: float32 [3, H, W]."""
    return np.clip(pixels + delta, 0, 255)


def adjust_contrast(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Scales every channel by `factor` (around 0, as Caffe and ssd.pytorch do), clipped."""
    return np.clip(pixels * factor, 0, 255)


def adjust_saturation_and_hue(pixels: np.ndarray, saturation: float, hue: float) -> np.ndarray:
    """Scales HSV saturation by `saturation` (clipped to [0, 1]) and rotates hue by `hue` degrees
    in [-360, 360], in one round trip through HSV, as ssd.pytorch does between its two
    ConvertColor steps. pixels: float32 [3, H, W]."""
    old_hue, old_saturation, value = rgb_to_hsv(pixels)
    new_saturation = np.minimum(old_saturation * saturation, 1)
    return np.clip(hsv_to_rgb(wrap_hue(old_hue + hue), new_saturation, value), 0, 255)


def adjust_saturation(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Scales HSV saturation by `factor`, clipped to [0, 1]; hue and value stay."""
    return adjust_saturation_and_hue(pixels, factor, 0.0)


class Photometric(NamedTuple):
    """The random choices of `photometric_distort`; None leaves a step out."""
    brightness: float | None      # delta added to every channel
    contrast_first: bool          # contrast before saturation and hue, or after them
    contrast: float | None        # factor on every channel
    saturation: float | None      # factor on HSV saturation
    hue: float | None             # degrees added to HSV hue
    channels: tuple | None        # new channel order


def sample_photometric(rng: np.random.Generator) -> Photometric:
    """Each step with probability 1/2; the order of contrast by a fair coin, as Caffe's
    `ApplyDistort` and ssd.pytorch's `PhotometricDistort` do."""
    def maybe(draw):
        return draw() if rng.random() < STEP_PROB else None
    return Photometric(
        brightness=maybe(lambda: rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)),
        contrast_first=bool(rng.random() < 0.5),
        contrast=maybe(lambda: rng.uniform(*CONTRAST_RANGE)),
        saturation=maybe(lambda: rng.uniform(*SATURATION_RANGE)),
        hue=maybe(lambda: rng.uniform(-HUE_DELTA, HUE_DELTA)),
        # One of the 6 orders, the identity included (ssd.pytorch's RandomLightingNoise).
        channels=maybe(lambda: tuple(int(c) for c in rng.permutation(3))))


def apply_photometric(pixels: np.ndarray, params: Photometric) -> np.ndarray:
    """Brightness; contrast, saturation and hue (or saturation, hue and contrast); channel order.

    Args:
      pixels: float32 planes [3, ...] in [0, 255] (any shape without saturation, hue and
        channel order, which mix the planes).
    Returns:
      float32, the shape of `pixels`, in [0, 255].
    """
    if params.brightness is not None:
        pixels = adjust_brightness(pixels, params.brightness)
    if params.contrast_first and params.contrast is not None:
        pixels = adjust_contrast(pixels, params.contrast)
    if params.hue is not None:
        pixels = adjust_saturation_and_hue(pixels, params.saturation or 1.0, params.hue)
    elif params.saturation is not None:
        pixels = adjust_saturation(pixels, params.saturation)
    if not params.contrast_first and params.contrast is not None:
        pixels = adjust_contrast(pixels, params.contrast)
    if params.channels is not None:
        pixels = pixels[list(params.channels)]
    return pixels


def photometric_distort(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SSD's photometric distortions (`sample_photometric`, `apply_photometric`) of an image.

    Every step maps each pixel's RGB on its own, so the result on any region of the image is the
    region of the result: `ssd_jax.data.augment` relies on this.

    Args:
      image: uint8 [H, W, 3].
    Returns:
      uint8 [H, W, 3], rounded from the float32 result.
    """
    params = sample_photometric(rng)
    pixels = np.moveaxis(image, -1, 0).astype(np.float32)  # planes [3, H, W]
    return np.rint(np.moveaxis(apply_photometric(pixels, params), 0, -1)).astype(np.uint8)


# --- Zoom out ("expand"). ---

class Expansion(NamedTuple):
    """Where zoom out puts an image: on a canvas_height x canvas_width canvas, its top-left pixel
    at (top, left). The identity placement is a canvas of the image's size at (0, 0)."""
    canvas_height: int
    canvas_width: int
    top: int
    left: int


def sample_expansion(height: int, width: int, rng: np.random.Generator) -> Expansion:
    """With probability 1/2, a canvas `ratio` times the image's sides, ratio uniform in [1, 4], and
    a uniform random integer position on it (ssd.pytorch's `Expand`); otherwise the identity."""
    if rng.random() >= STEP_PROB:
        return Expansion(height, width, 0, 0)
    ratio = rng.uniform(1.0, MAX_EXPAND_RATIO)
    canvas_height, canvas_width = int(height * ratio), int(width * ratio)
    top = int(rng.uniform(0, canvas_height - height))
    left = int(rng.uniform(0, canvas_width - width))
    return Expansion(canvas_height, canvas_width, top, left)


def expand_boxes(boxes: np.ndarray, expansion: Expansion, height: int, width: int) -> np.ndarray:
    """Boxes of a height x width image -> the same boxes normalized to the expansion's canvas.

    Args:
      boxes: [G, 4] corners normalized to the image.
    Returns:
      float32 [G, 4] corners normalized to the canvas.
    """
    image_size = np.array([width, height, width, height], np.float64)
    offset = np.array([expansion.left, expansion.top] * 2, np.float64)
    canvas_size = np.array([expansion.canvas_width, expansion.canvas_height] * 2, np.float64)
    return ((boxes * image_size + offset) / canvas_size).astype(np.float32)


def filled_canvas(height: int, width: int, mean) -> np.ndarray:
    """uint8 [height, width, 3] of the RGB `mean` (0..255 scale) rounded."""
    return np.full((height, width, 3), np.clip(np.rint(mean), 0, 255), np.uint8)


def expand(image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator,
           mean=MEAN_RGB) -> tuple[np.ndarray, np.ndarray]:
    """Zoom out: the image on a larger canvas of the mean colour (see `sample_expansion`).

    Args:
      image: uint8 [H, W, 3].
      boxes: [G, 4] corners normalized to the image.
      mean: RGB fill colour on the 0..255 scale (rounded).
    Returns:
      (canvas uint8 [H', W', 3] with H' >= H, W' >= W, boxes float32 [G, 4] normalized to it).
    """
    height, width = image.shape[:2]
    expansion = sample_expansion(height, width, rng)
    if (expansion.canvas_height, expansion.canvas_width) == (height, width):
        return image, boxes
    canvas = filled_canvas(expansion.canvas_height, expansion.canvas_width, mean)
    canvas[expansion.top:expansion.top + height, expansion.left:expansion.left + width] = image
    return canvas, expand_boxes(boxes, expansion, height, width)


# --- Min-IoU random crop. ---

def _centres_inside(boxes, patches):
    """[G, 4] boxes and [T, 4] patches (same normalization) -> bool [T, G]: the box's centre lies
    strictly inside the patch."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    return np.all((centres > patches[:, None, :2]) & (centres < patches[:, None, 2:]), axis=-1)


def sample_patch(boxes: np.ndarray, height: int, width: int, min_iou: float,
                 rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    """Up to 50 random patches of a height x width image; the first that
      * has IoU >= min_iou with at least one object (Caffe's constraint), and
      * contains at least one object's centre.
    Patch sides are uniform in [0.3, 1] of the image's, height / width in [1/2, 2]; position
    uniform; corners truncated to whole pixels (ssd.pytorch's `RandomSampleCrop`).

    Args:
      boxes: [G, 4] corners normalized to the image.
    Returns:
      the patch in pixels (left, top, right, bottom) with right > left, bottom > top; or None
      when every trial fails (always when G == 0).
    """
    sides = rng.uniform(*PATCH_SIDE_RANGE, size=(PATCH_TRIALS, 2)) * (width, height)
    corners = rng.uniform(size=(PATCH_TRIALS, 2)) * ((width, height) - sides)
    patches = np.concatenate([corners, corners + sides], axis=1).astype(np.int64)
    aspect = sides[:, 1] / sides[:, 0]
    valid = ((aspect >= PATCH_ASPECT_RANGE[0]) & (aspect <= PATCH_ASPECT_RANGE[1])
             & (patches[:, 2] > patches[:, 0]) & (patches[:, 3] > patches[:, 1]))
    normalized = patches / np.array([width, height, width, height], np.float64)
    overlaps = iou(boxes, normalized).T                                   # [T, G]
    valid &= np.any(overlaps >= min_iou, axis=1)
    valid &= np.any(_centres_inside(boxes, normalized), axis=1)
    if not valid.any():
        return None
    return tuple(int(x) for x in patches[np.argmax(valid)])


def sample_crop(boxes: np.ndarray, height: int, width: int,
                rng: np.random.Generator) -> tuple[int, int, int, int]:
    """The paper's patch choice: a minimum IoU uniformly from MIN_IOU_CHOICES, then
    `sample_patch`; when that fails, a new choice (ssd.pytorch's loop). Ends once the choice is
    None, the whole image, which is certain to happen.

    Returns: the patch in pixels (left, top, right, bottom); (0, 0, width, height) for the whole
    image.
    """
    while True:
        min_iou = MIN_IOU_CHOICES[rng.integers(len(MIN_IOU_CHOICES))]
        if min_iou is None:
            return 0, 0, width, height
        patch = sample_patch(boxes, height, width, min_iou, rng)
        if patch is not None:
            return patch


def crop_boxes(boxes: np.ndarray, patch, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The objects a patch keeps, those whose centre lies strictly inside it, their boxes clipped
    to the patch and normalized to it.

    Args:
      boxes: [G, 4] corners normalized to the height x width image.
      patch: pixels (left, top, right, bottom).
    Returns:
      (boxes float32 [K, 4] normalized to the patch, kept int64 [K]: their indices in `boxes`).
      The whole image keeps every object and its box unchanged.
    """
    patch = np.asarray(patch, np.float64) / (width, height, width, height)
    kept = np.flatnonzero(_centres_inside(boxes, patch[None])[0])
    clipped = np.clip(boxes[kept], np.tile(patch[:2], 2), np.tile(patch[2:], 2))
    origin, size = patch[:2], patch[2:] - patch[:2]
    return ((clipped - np.tile(origin, 2)) / np.tile(size, 2)).astype(np.float32), kept


def crop(image: np.ndarray, boxes: np.ndarray,
         patch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """image uint8 [H, W, 3], boxes [G, 4], patch (left, top, right, bottom) pixels ->
    (image [bottom - top, right - left, 3], boxes float32 [K, 4], kept int64 [K]); see
    `crop_boxes`."""
    left, top, right, bottom = patch
    boxes, kept = crop_boxes(boxes, patch, *image.shape[:2])
    return image[top:bottom, left:right], boxes, kept


def random_crop(image, boxes, rng):
    """`crop` to the patch `sample_crop` picks. Returns (image, boxes, kept)."""
    return crop(image, boxes, sample_crop(boxes, *image.shape[:2], rng))


# --- Horizontal flip. ---

def flip_boxes(boxes: np.ndarray) -> np.ndarray:
    """[G, 4] normalized corners -> float32 [G, 4], mirrored left-right."""
    xmin, ymin, xmax, ymax = np.asarray(boxes, np.float32).T
    return np.stack([1 - xmax, ymin, 1 - xmin, ymax], axis=1)


def flip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right: image [H, W, 3] (a view) and boxes [G, 4] normalized corners."""
    return image[:, ::-1], flip_boxes(boxes)


def sample_flip(rng: np.random.Generator) -> bool:
    return bool(rng.random() < STEP_PROB)


def random_flip(image, boxes, rng):
    return flip(image, boxes) if sample_flip(rng) else (image, boxes)


# --- Resize. ---

def bilinear_taps(input_size: int, output_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where a 1-D bilinear resize reads, OpenCV's INTER_LINEAR: output pixel centre i + 1/2
    maps to input position (i + 1/2) * input_size / output_size - 1/2, clamped to the first and
    last input pixel. Returns (low, high, weight), [output_size] each: output pixel i is
    (1 - weight[i]) * input[low[i]] + weight[i] * input[high[i]], high = low + 1 clamped."""
    position = (np.arange(output_size) + 0.5) * (input_size / output_size) - 0.5
    position = np.clip(position, 0, input_size - 1)
    low = np.floor(position).astype(np.int64)
    return low, np.minimum(low + 1, input_size - 1), (position - low).astype(np.float32)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of uint8 [H, W, 3] to uint8 [size, size, 3], in float32, rounded:
    first between two rows, then between two columns of that. Normalized boxes need no
    change."""
    top, bottom, row_weight = bilinear_taps(image.shape[0], size)
    left, right, column_weight = bilinear_taps(image.shape[1], size)
    pixels = image.astype(np.float32)
    pixels = pixels[top] + (pixels[bottom] - pixels[top]) * row_weight[:, None, None]
    pixels = (pixels[:, left] + (pixels[:, right] - pixels[:, left])
              * column_weight[None, :, None])
    return np.rint(pixels).astype(np.uint8)


# --- The whole training transform. ---

def check_example(example: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validates a source example; returns (image, boxes float32, labels, difficult)."""
    image = np.asarray(example["image"])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"image must be uint8 [H, W, 3] with H, W > 0, got {image.dtype} "
                         f"{image.shape}")
    boxes = check_boxes(np.asarray(example["boxes"], np.float32).reshape(-1, 4), "boxes",
                        strict=True)
    if boxes.size and (boxes.min() < 0 or boxes.max() > 1):
        raise ValueError("boxes must be normalized to [0, 1], got values in "
                         f"[{boxes.min()}, {boxes.max()}]")
    labels, difficult = np.asarray(example["labels"]), np.asarray(example["difficult"], bool)
    if labels.shape != (len(boxes),) or difficult.shape != (len(boxes),):
        raise ValueError(f"labels {labels.shape} and difficult {difficult.shape} must have "
                         f"shape ({len(boxes)},), one per box")
    return image, boxes, labels, difficult


def ssd_augment(example: dict, rng: np.random.Generator, *, image_size: int,
                mean=MEAN_RGB) -> dict:
    """SSD's training augmentation of one example: photometric distortions, zoom out, min-IoU
    crop, flip and resize, in that order.

    Args:
      example: {"image": uint8 [H, W, 3], "boxes": [G, 4] corners normalized to [0, 1],
        "labels": [G], "difficult": bool [G], other keys passed through}.
      rng: the example's generator; the same generator state gives the same output.
      image_size: side S of the square output image.
      mean: RGB fill colour of the zoom-out canvas, 0..255 scale.
    Returns:
      The example with "image": uint8 [S, S, 3], "boxes": float32 [K, 4] normalized corners,
      "labels" [K] and "difficult" bool [K] of the K <= G objects the crop keeps, in their
      original order.
    """
    image, boxes, labels, difficult = check_example(example)
    photometric_rng, expand_rng, crop_rng, flip_rng = split_rng(rng, 4)
    image = photometric_distort(image, photometric_rng)
    image, boxes = expand(image, boxes, expand_rng, mean)
    image, boxes, kept = random_crop(image, boxes, crop_rng)
    image, boxes = random_flip(image, boxes, flip_rng)
    return {**example, "image": resize(image, image_size), "boxes": boxes,
            "labels": labels[kept], "difficult": difficult[kept]}


def ssd_train_transform(image_size: int, mean=MEAN_RGB):
    """`ssd_augment` as a picklable `transform(example, rng)` for
    `ssd_jax.data.pipeline.make_train_loader`; pass the model's input size and pixel mean
    (`ModelConfig.priors.image_size`, `ModelConfig.pixel_mean`)."""
    check_positive_int(image_size, "image_size")
    if np.shape(mean) != (3,):
        raise ValueError(f"mean must be 3 RGB values, got {mean!r}")
    return functools.partial(ssd_augment, image_size=int(image_size),
                             mean=tuple(float(m) for m in mean))
