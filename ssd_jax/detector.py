"""Detect objects in ordinary images: file paths, PIL images or uint8 arrays of any size.

    detector = Detector.from_checkpoint("runs/shapes")
    result = detector("photo.jpg")        # one image in, one dict out
    results = detector(["a.png", image])  # a list in, a list out

Each image is resized (`reference.augment.resize`, bilinear, as the training pipeline does) to the model's square input on
the host; the forward pass, `nms.detect` and the scaling of the boxes back to the original
image's pixels run on the device as one jitted function. Images go through it in chunks of
exactly `batch_size` (the last chunk padded), so images of any mix of sizes compile it once.
"""
import colorsys
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw, ImageFont

from reference.augment import resize
from reference.priors import prior_boxes
from reference.validation import check_positive_int, check_threshold
from ssd_jax import inference
from ssd_jax.data.images import decode_image, read_image, to_rgb
from ssd_jax.model import SSD
from ssd_jax.train import load_trained_model

# Shows what the model is fairly sure of without hiding many true objects. mAP evaluation uses
# 0.01 instead (the paper's section 3.7): average precision rewards every extra true positive.
DEFAULT_SCORE_THRESHOLD = 0.3


class Detector:
    """A trained SSD as a function from images to detections.

    Calling it with one image (a file path, image file bytes, a PIL image of any mode or a uint8
    array [H, W, 3]; grayscale [H, W] and RGBA [H, W, 4] are converted to RGB) returns one dict; a list of images (or a
    uint8 array [N, H, W, 3]) returns a list of dicts, in order:

      boxes: [K, 4] float32 corners (xmin, ymin, xmax, ymax) in pixels of the ORIGINAL image
        (0 <= x <= width, 0 <= y <= height).
      scores: [K] float32 class probabilities above `score_threshold`, descending.
      labels: [K] int32 classes in 1..C.
      class_names: [K] list of str, the name of each label.

    Bad input (an unreadable file, a float or wrongly shaped array) raises ValueError naming it.
    """

    def __init__(self, model, class_names, *, score_threshold: float = DEFAULT_SCORE_THRESHOLD,
                 iou_threshold: float = 0.45, top_k: int = 200, batch_size: int = 8):
        """Wraps an in-memory model.

        Args:
          model: an `ssd_jax.model.SSD`.
          class_names: C names, of labels 1..C.
          score_threshold: a detection needs a class probability above it (default 0.3: what the
            model is fairly sure of; mAP evaluation uses 0.01).
          iou_threshold: per-class NMS overlap above which the lower-scored box is dropped.
          top_k: most detections per image.
          batch_size: images per compiled call; more uses the accelerator better, and costs
            padding when fewer images are given.
        """
        if not isinstance(model, SSD):
            raise ValueError(f"model must be an ssd_jax.model.SSD (or use "
                             f"Detector.from_checkpoint), got {type(model).__name__}")
        if len(class_names) != model.config.num_classes:
            raise ValueError(f"the model has {model.config.num_classes} classes but "
                             f"{len(class_names)} class names were given")
        self.class_names = list(class_names)
        self.image_size = model.config.priors.image_size
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.score_threshold = check_threshold(score_threshold, "score_threshold")
        self.iou_threshold = check_threshold(iou_threshold, "iou_threshold")
        self.top_k = check_positive_int(top_k, "top_k")
        graphdef, self._params, self._rest = nnx.split(model, nnx.Param, ...)
        predict = inference.make_predict_fn(
            graphdef, prior_boxes(model.config.priors), score_threshold=self.score_threshold,
            iou_threshold=self.iou_threshold, top_k=self.top_k)

        @jax.jit
        def forward(params, rest, images, sizes):
            """images uint8 [B, S, S, 3], sizes float32 [B, 2] original (width, height)."""
            outputs = predict(params, rest, images)
            return dict(outputs, boxes=outputs["boxes"] * jnp.tile(sizes, 2)[:, None, :])

        self._forward = forward

    @classmethod
    def from_checkpoint(cls, path, *, step: int | None = None, **options) -> "Detector":
        """The detector of a training run: `path` is its workdir or checkpoints/ folder, `step`
        defaults to the latest; class names come from the checkpoint. `options` are the keyword
        arguments of `Detector(...)`. Raises FileNotFoundError if there is no checkpoint and
        ValueError if the checkpoint is not one ssd_jax can load."""
        try:
            model, meta = load_trained_model(path, step)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} is not a checkpoint this version of ssd_jax can load "
                             f"({type(error).__name__}: {error})") from error
        return cls(model, meta["class_names"], **options)

    def __call__(self, images):
        if _is_single_image(images):
            return self.detect([images])[0]
        return self.detect(list(images))

    def detect(self, images: list) -> list[dict]:
        """Detections of each image of the list (see the class docstring)."""
        # Dispatch is asynchronous: the host reads and resizes the next chunk while the device
        # works on this one. Only the small fixed-size outputs stay alive until unpacked.
        dispatched = []
        for start in range(0, len(images), self.batch_size):
            chunk = [load_image(image, f"images[{start + i}]")
                     for i, image in enumerate(images[start:start + self.batch_size])]
            dispatched.append((self._run_chunk(chunk), len(chunk)))
        return [detection for outputs, count in dispatched
                for detection in self._unpack(outputs, count)]

    def _run_chunk(self, chunk: list[np.ndarray]) -> dict:
        size = self.image_size
        images = np.zeros((self.batch_size, size, size, 3), np.uint8)  # padding stays black
        sizes = np.ones((self.batch_size, 2), np.float32)
        for i, image in enumerate(chunk):
            images[i] = resize(image, size)
            sizes[i] = image.shape[1], image.shape[0]
        return self._forward(self._params, self._rest, images, sizes)

    def _unpack(self, outputs: dict, count: int) -> list[dict]:
        keep = np.arange(self.batch_size) < count
        detections = inference.unbatch_detections(outputs, keep)
        for detection in detections:
            detection["class_names"] = [self.class_names[label - 1]
                                        for label in detection["labels"]]
        return detections


def _is_single_image(images) -> bool:
    if isinstance(images, (str, os.PathLike, Image.Image, bytes, bytearray, memoryview)):
        return True
    if images is None or not isinstance(images, (list, tuple, np.ndarray, jax.Array)):
        raise ValueError("images must be an image (a file path, image file bytes, a PIL image "
                         "or a uint8 array) or a list of them, got "
                         f"{type(images).__name__}")
    return isinstance(images, (np.ndarray, jax.Array)) and images.ndim <= 3


def load_image(image, name: str | None = None) -> np.ndarray:
    """One image as uint8 [H, W, 3] RGB.

    Args:
      image: a file path, the bytes of an image file, a PIL image (any mode, converted as
        `ssd_jax.data.images.to_rgb` says: 16-bit grey scaled, alpha dropped), or a uint8 array
        [H, W, 3], [H, W, 4] (RGBA: alpha dropped) or [H, W] / [H, W, 1] (grayscale).
      name: what error messages call the image, e.g. "images[3]" (a file is named by its path).
    Raises ValueError naming the image if it is none of these or cannot be decoded.
    """
    prefix = f"{name}: " if name else ""
    if isinstance(image, (str, os.PathLike)):
        try:
            return read_image(image)
        except OSError as error:
            raise ValueError(f"{prefix}{error}") from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            return decode_image(bytes(image))
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"{prefix}the {len(image)} bytes given are not an image file "
                             f"Pillow can read ({error})") from None
    if isinstance(image, Image.Image):
        return to_rgb(image)
    name = name or "image"
    if not isinstance(image, (np.ndarray, jax.Array)):
        raise ValueError(f"{name} must be a file path, image file bytes, a PIL image or a uint8 "
                         f"array, got {type(image).__name__}")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"{name} must hold uint8 pixels (0..255), got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    channels = array.shape[2] if array.ndim == 3 else 1
    if array.ndim not in (2, 3) or channels not in (1, 3, 4) or 0 in array.shape:
        raise ValueError(f"{name} must be an image array [H, W, 3] (or [H, W] grayscale, "
                         f"[H, W, 4] RGBA), got shape {array.shape}")
    if channels == 3:
        return array
    return np.asarray(Image.fromarray(array).convert("RGB"))


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct RGB colour for class `label`: hues a golden angle apart never repeat."""
    red, green, blue = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 0.95)
    return int(red * 255), int(green * 255), int(blue * 255)


def draw_detections(image, detections: dict) -> Image.Image:
    """A copy of `image` (anything `load_image` takes) with each detection's box and
    "class score" label drawn in its class's colour."""
    canvas = Image.fromarray(load_image(image))
    draw = ImageDraw.Draw(canvas)
    side = min(canvas.size)
    width = max(1, round(side / 200))
    font = ImageFont.load_default(size=max(10, side // 30))
    # Lowest score first, so the most confident boxes and labels end up on top.
    for box, score, label, name in reversed(list(zip(
            detections["boxes"], detections["scores"], detections["labels"],
            detections["class_names"]))):
        colour = class_colour(int(label))
        xmin, ymin, xmax, ymax = (float(v) for v in box)
        draw.rectangle((xmin, ymin, xmax, ymax), outline=colour, width=width)
        text = f"{name} {score:.2f}"
        _, _, text_width, text_height = draw.textbbox((0, 0), text, font=font)
        label_height = text_height + 2 * width
        # Above the box, or inside it when the box touches the image's top.
        top = ymin - label_height if ymin >= label_height else ymin
        draw.rectangle((xmin, top, xmin + text_width + 2 * width, top + label_height), fill=colour)
        draw.text((xmin + width, top + width), text, fill=_text_colour(colour), font=font)
    return canvas


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)
