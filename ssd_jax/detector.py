"""Detect objects in ordinary images: file paths, PIL images or uint8 arrays of any size.

    detector = Detector.from_checkpoint("runs/shapes")
    result = detector("photo.jpg")        # one image in, one dict out
    results = detector(["a.png", image])  # a list in, a list out

Each image is resized on the host to the model's square input, the way the checkpoint's
inference settings say (`ssd_jax.data.resize`: by default the training pipeline's bilinear uint8
resize; a converted peer's own resize); the forward pass, `nms.detect` and the scaling of the
boxes back to the original image's pixels run on the device as one jitted function. Images go
through it in chunks of exactly `batch_size` (the last chunk padded), so images of any mix of
sizes compile it once.
"""
import colorsys
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw, ImageFont

from ssd_jax.data.resize import resize_image
from reference.validation import check_positive_int
from ssd_jax import inference, platform
from ssd_jax.checkpoint import load_model
from ssd_jax.data.images import decode_image, read_image, to_rgb
from ssd_jax.inference import InferenceConfig
from ssd_jax.model import SSD


class Detector:
    """A trained SSD as a function from images to detections.

    Calling it with one image (a file path, image file bytes, a PIL image of any mode or a uint8
    array [H, W, 3]; grayscale [H, W] and RGBA [H, W, 4] are converted to RGB) returns one dict;
    a list of images (or a uint8 array [N, H, W, 3]) returns a list of dicts, in order:

      boxes: [K, 4] float32 corners (xmin, ymin, xmax, ymax) in pixels of the ORIGINAL image
        (within it when the settings clip boxes).
      scores: [K] float32 class probabilities above the score threshold, descending.
      labels: [K] int32 labels in the checkpoint's own label space (`label_ids`; 1..C unless
        the checkpoint says otherwise, e.g. COCO category ids for torchvision's COCO model).
      class_names: [K] list of str, the name of each label.

    Bad input (an unreadable file, a float or wrongly shaped array) raises ValueError naming it.
    """

    def __init__(self, model, class_names, settings: InferenceConfig = InferenceConfig(), *,
                 label_ids=None, batch_size: int = 8, **setting_overrides):
        """Wraps an in-memory model.

        Args:
          model: an `ssd_jax.model.SSD`.
          class_names: C names, of classes 1..C.
          settings: how outputs become detections (`inference.InferenceConfig`; by default
            the paper's: score threshold 0.01, as mAP evaluation wants, which shows many
            unsure boxes: pass score_threshold=0.3 to see what the model is fairly sure of).
          label_ids: C ints, the label each class is reported as (default 1..C).
          batch_size: images per compiled call; more uses the accelerator better, and costs
            padding when fewer images are given.
          setting_overrides: fields of `settings` to replace, e.g. score_threshold=0.3.
        """
        if not isinstance(model, SSD):
            raise ValueError(f"model must be an ssd_jax.model.SSD (or use "
                             f"Detector.from_checkpoint), got {type(model).__name__}")
        if len(class_names) != model.config.num_classes:
            raise ValueError(f"the model has {model.config.num_classes} classes but "
                             f"{len(class_names)} class names were given")
        self.class_names = list(class_names)
        self.label_ids = np.arange(1, len(class_names) + 1, dtype=np.int32) if label_ids is None \
            else np.asarray(label_ids, np.int32)
        if self.label_ids.shape != (len(class_names),):
            raise ValueError(f"label_ids must hold {len(class_names)} labels, one per class, "
                             f"got {len(self.label_ids)}")
        try:
            self.settings = dataclasses.replace(settings, **setting_overrides)
        except TypeError as error:  # an unknown keyword
            raise ValueError(f"unknown inference setting: {error}") from None
        self.image_size = model.config.priors.image_size
        self.batch_size = check_positive_int(batch_size, "batch_size")
        graphdef, self._params, self._rest = nnx.split(model, nnx.Param, ...)
        predict = inference.predict_function(graphdef, model.config, self.settings)

        @functools.partial(jax.jit, compiler_options=platform.compiler_options(inference=True))
        def forward(params, rest, images, sizes):
            """images [B, S, S, 3], sizes float32 [B, 2] original (width, height)."""
            outputs = predict(params, rest, images)
            return dict(outputs, boxes=outputs["boxes"] * jnp.tile(sizes, 2)[:, None, :])

        self._forward = forward

    @property
    def score_threshold(self) -> float:
        return self.settings.score_threshold

    @classmethod
    def from_checkpoint(cls, path, *, step: int | None = None, batch_size: int = 8,
                        **setting_overrides) -> "Detector":
        """The detector of a checkpoint: a training run's folder (or its checkpoints/ folder) or
        a converted peer's (`experiments.convert_ssd`); `step` defaults to the newest intact one
        (damaged newer steps are skipped with a warning). Class
        names, label space and inference settings come from the checkpoint, so a converted
        checkpoint gives its peer's own detections; `setting_overrides` replace settings (e.g.
        score_threshold=0.3). Raises FileNotFoundError if there is no checkpoint and
        ValueError if the checkpoint is not one ssd_jax can load."""
        loaded = load_model(path, step)
        return cls(loaded.model, loaded.class_names, loaded.inference,
                   label_ids=loaded.label_ids, batch_size=batch_size, **setting_overrides)

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
        dtype = np.float32 if self.settings.resize == "float" else np.uint8
        images = np.zeros((self.batch_size, size, size, 3), dtype)  # padding stays black
        sizes = np.ones((self.batch_size, 2), np.float32)
        for i, image in enumerate(chunk):
            images[i] = resize_image(image, size, self.settings.resize)
            sizes[i] = image.shape[1], image.shape[0]
        return self._forward(self._params, self._rest, images, sizes)

    def _unpack(self, outputs: dict, count: int) -> list[dict]:
        keep = np.arange(self.batch_size) < count
        detections = inference.unbatch_detections(outputs, keep)
        for detection in detections:
            classes = detection["labels"] - 1
            detection["labels"] = self.label_ids[classes]
            detection["class_names"] = [self.class_names[c] for c in classes]
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
