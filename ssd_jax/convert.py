"""ImageNet-pretrained VGG16 for SSD's backbone: convert PyTorch weights, load them by layer name.

The paper (section 3) starts from VGG16 pretrained on ILSVRC CLS-LOC, with fc6 and fc7 turned into
convolutions and subsampled (the "reduced fc" model). Two PyTorch state dicts are understood:

- torchvision's `vgg16` (IMAGENET1K_V1): keys features.<i>.weight/bias for the 13 convs and
  classifier.0 (fc6, [4096, 512 * 7 * 7]) and classifier.3 (fc7, [4096, 4096]). fc6 and fc7 are
  reduced here as in the Caffe release (DeepLab's recipe): fc6 viewed as a [4096, 512, 7, 7]
  conv keeps output filters 0::4 and kernel taps 0::3 in both directions -> conv6 [1024, 512, 3, 3]
  (the taps, 3 apart, become the dilated 3x3 kernel); fc7 keeps outputs 0::4 and inputs 0::4 ->
  conv7 [1024, 1024, 1, 1]; biases keep 0::4.
- ssd.pytorch's `vgg16_reducedfc.pth` (Caffe's VGG_ILSVRC_16_layers_fc_reduced): keys <i>.weight /
  bias of its `vgg` layer list, the same 13 conv indices, then conv6 at 31 and conv7 at 33,
  already reduced.

Either is read from a .pth (without PyTorch: `ssd_jax.pth`) or from an .npz holding the same
state dict (`numpy.savez(path, **state_dict)`).

The trained SSD detectors of torchvision, ssd.pytorch, lufficc/SSD and mmdetection are converted
further below (`convert_detector`), reusing the VGG16 layer indices.

Weight file written (.npz): "<layer>/kernel" float32 HWIO [kh, kw, I, O] (PyTorch's OIHW
transposed) and "<layer>/bias" [O] for conv1_1 ... conv5_3, conv6, conv7 (ssd_jax.model's
backbone names), plus "pixel_mean" and "pixel_std", RGB on the 0..255 scale: the input
normalization the weights were trained with. Build the model with them (`backbone_pixel_stats`):

- torchvision: RGB, ImageNet mean and std (ssd_jax.model's defaults).
- Caffe: BGR 0..255 minus the mean (104, 117, 123), no std. conv1_1's input channels are reversed
  here, so RGB images with pixel_mean (123, 117, 104) and pixel_std (1, 1, 1) give exactly Caffe's
  activations, padding included (folding the mean into a bias instead would be wrong at the image
  border, where zero padding means a different pixel value). Keeping Caffe's input scale also
  keeps the training dynamics of the Caffe / ssd.pytorch recipe for these weights.
  (ssd.pytorch itself feeds RGB images to these BGR weights; this converter follows Caffe.)
"""
import argparse
import dataclasses
import functools
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from reference.priors import SSD300, SSD512, PriorConfig
from ssd_jax.checkpoint import checkpoint_meta, save_model
from ssd_jax.data.voc import VOC_CLASSES
from ssd_jax.inference import InferenceConfig
from ssd_jax.model import IMAGENET_MEAN, IMAGENET_STD, SSD, Conv, ModelConfig, get_config
from ssd_jax.pth import read_pth

VGG16_CONVS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
               "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")
# Index of each conv in torchvision's `features` and in ssd.pytorch's `vgg` list (conv, ReLU and
# pool modules interleaved the same way in both).
TORCH_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
SSD_PYTORCH_FC_INDICES = {"conv6": 31, "conv7": 33}
BACKBONE_LAYERS = VGG16_CONVS + ("conv6", "conv7")
CAFFE_MEAN_BGR = (104.0, 117.0, 123.0)
REDUCE_FILTERS = 4  # keep every 4th fc6/fc7 unit: 4096 -> 1024
REDUCE_TAPS = 3     # keep every 3rd tap of fc6's 7x7 window: 7 -> 3


def read_state_dict(path) -> dict[str, np.ndarray]:
    """A PyTorch state dict from a .pth / .pt file (read without torch, `ssd_jax.pth`) or an
    .npz of the same keys. A training checkpoint around the state dict ({"model": ...} as
    lufficc/SSD saves, {"state_dict": ...} as mmdetection does) gives the state dict; a
    "module." prefix (DataParallel) is dropped; entries that are not arrays are left out."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            return {key: arrays[key] for key in arrays.files}
    value = read_pth(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(value, dict) and isinstance(value.get(wrapper), dict):
            value = value[wrapper]
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a state dict")
    return {key.removeprefix("module."): array for key, array in value.items()
            if isinstance(array, np.ndarray)}


def _tensor(state: dict, key: str, ndim: int) -> np.ndarray:
    if key not in state:
        raise ValueError(f"the state dict has no {key!r}")
    value = np.asarray(state[key], np.float32)
    if value.ndim != ndim:
        raise ValueError(f"{key} should have {ndim} dimensions, got shape {value.shape}")
    return value


def _conv_layers(state: dict, prefix: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The 13 VGG16 convs: name -> (OIHW kernel, bias)."""
    return {name: (_tensor(state, f"{prefix}{index}.weight", 4),
                   _tensor(state, f"{prefix}{index}.bias", 1))
            for name, index in zip(VGG16_CONVS, TORCH_CONV_INDICES)}


def reduce_fc6(weight: np.ndarray, bias: np.ndarray, in_channels: int):
    """fc6 [F, C * 7 * 7] -> conv6 OIHW [F / 4, C, 3, 3] (filters 0::4, taps 0::3) and bias."""
    side = 7
    if weight.shape[1] != in_channels * side * side:
        raise ValueError(f"fc6 weight {weight.shape} does not take conv5_3's {in_channels} "
                         f"channels x {side} x {side}")
    as_conv = weight.reshape(weight.shape[0], in_channels, side, side)  # PyTorch flattens C, H, W
    return (as_conv[::REDUCE_FILTERS, :, ::REDUCE_TAPS, ::REDUCE_TAPS],
            bias[::REDUCE_FILTERS])


def reduce_fc7(weight: np.ndarray, bias: np.ndarray):
    """fc7 [F, F] -> conv7 OIHW [F / 4, F / 4, 1, 1] (outputs and inputs 0::4) and bias."""
    kept = weight[::REDUCE_FILTERS, ::REDUCE_FILTERS]
    return kept[:, :, None, None], bias[::REDUCE_FILTERS]


def convert_torchvision(state: dict) -> dict:
    layers = _conv_layers(state, "features.")
    layers["conv6"] = reduce_fc6(_tensor(state, "classifier.0.weight", 2),
                                 _tensor(state, "classifier.0.bias", 1),
                                 in_channels=layers["conv5_3"][0].shape[0])
    layers["conv7"] = reduce_fc7(_tensor(state, "classifier.3.weight", 2),
                                 _tensor(state, "classifier.3.bias", 1))
    return _weight_file(layers, IMAGENET_MEAN, IMAGENET_STD)


def convert_ssd_pytorch(state: dict) -> dict:
    layers = _conv_layers(state, "")
    for name, index in SSD_PYTORCH_FC_INDICES.items():
        layers[name] = (_tensor(state, f"{index}.weight", 4), _tensor(state, f"{index}.bias", 1))
    kernel, bias = layers["conv1_1"]
    layers["conv1_1"] = (kernel[:, ::-1], bias)  # Caffe's BGR input channels -> RGB
    return _weight_file(layers, CAFFE_MEAN_BGR[::-1], (1.0, 1.0, 1.0))


def _weight_file(layers: dict, pixel_mean, pixel_std) -> dict[str, np.ndarray]:
    arrays = {"pixel_mean": np.asarray(pixel_mean, np.float64),  # float64: exact config values
              "pixel_std": np.asarray(pixel_std, np.float64)}
    for name, (kernel, bias) in layers.items():
        arrays[f"{name}/kernel"] = np.ascontiguousarray(kernel.transpose(2, 3, 1, 0))  # -> HWIO
        arrays[f"{name}/bias"] = np.ascontiguousarray(bias)
    return arrays


def convert_state_dict(state: dict) -> tuple[str, dict[str, np.ndarray]]:
    """(layout name, weight file arrays) of a torchvision or ssd.pytorch VGG16 state dict."""
    if "features.0.weight" in state:
        return "torchvision vgg16", convert_torchvision(state)
    if "0.weight" in state and f"{SSD_PYTORCH_FC_INDICES['conv6']}.weight" in state:
        return "ssd.pytorch vgg16_reducedfc (Caffe)", convert_ssd_pytorch(state)
    raise ValueError("not a VGG16 state dict this converter knows: expected torchvision's "
                     "features.0.weight ... or ssd.pytorch's 0.weight ... 31.weight; got keys "
                     f"{sorted(state)[:6]} ...")


def read_backbone_weights(path) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """A weight file -> ({layer: {"kernel": HWIO, "bias": [O]}}, {"pixel_mean", "pixel_std"})."""
    with np.load(path) as arrays:
        arrays = {key: arrays[key] for key in arrays.files}
    stats = _pixel_stats(arrays, path)
    layers = {}
    for key, value in arrays.items():
        if "/" in key:
            layer, param = key.split("/", 1)
            layers.setdefault(layer, {})[param] = value
    return layers, stats


def _pixel_stats(arrays: dict, path) -> dict:
    if "pixel_mean" not in arrays or "pixel_std" not in arrays:
        raise ValueError(f"{path} has no pixel_mean / pixel_std: not a weight file written by "
                         "experiments.convert_vgg16")
    return {key: tuple(float(v) for v in arrays[key]) for key in ("pixel_mean", "pixel_std")}


def backbone_pixel_stats(path) -> dict:
    """{"pixel_mean": (r, g, b), "pixel_std": (r, g, b)} a weight file's backbone expects:
    ModelConfig overrides, e.g. get_config("ssd300", **backbone_pixel_stats(path))."""
    with np.load(path) as arrays:
        return _pixel_stats(arrays, path)


def load_backbone_weights(model, path) -> None:
    """Loads a weight file into `model.backbone` (an ssd_jax.model.SSD), in place.

    Every layer and shape is checked before anything is written: a missing or extra layer, a
    shape mismatch, or pixel statistics other than the model's raise a ValueError naming it.
    """
    layers, stats = read_backbone_weights(path)
    config = model.config
    for key, value in stats.items():
        if not np.allclose(getattr(config, key), value, atol=1e-3):
            raise ValueError(f"{path} expects {key}={value} but {config.name} has "
                             f"{getattr(config, key)}: build it with "
                             "get_config(..., **backbone_pixel_stats(path))")
    convs = dict(model.backbone.items())
    missing, extra = sorted(convs.keys() - layers.keys()), sorted(layers.keys() - convs.keys())
    if missing or extra:
        raise ValueError(f"{path} does not match {config.name}'s backbone: layers missing from "
                         f"the file {missing}, layers the model lacks {extra}")
    for name, conv in convs.items():
        for param in ("kernel", "bias"):
            want = tuple(getattr(conv, param).shape)
            got = layers[name][param].shape if param in layers[name] else "no array"
            if got != want:
                raise ValueError(f"{path}: layer {name} {param} has shape {got}, "
                                 f"{config.name} expects {want}")
    for name, conv in convs.items():
        conv.kernel.set_value(jnp.asarray(layers[name]["kernel"], jnp.float32))
        conv.bias.set_value(jnp.asarray(layers[name]["bias"], jnp.float32))


def convert_file(source, output) -> str:
    """Converts a VGG16 state dict file to a weight file; returns the layout it recognised."""
    layout, arrays = convert_state_dict(read_state_dict(source))
    with open(output, "wb") as f:  # a file object: numpy would append .npz to a bare name
        np.savez(f, **arrays)
    return layout


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Convert an ImageNet VGG16 (torchvision vgg16 or ssd.pytorch "
        "vgg16_reducedfc, as .pth or .npz) to SSD backbone weights (.npz).")
    parser.add_argument("source", help="PyTorch state dict: .pth (needs torch) or .npz")
    parser.add_argument("output", help="weight file to write (.npz)")
    args = parser.parse_args(argv)
    layout = convert_file(args.source, args.output)
    stats = backbone_pixel_stats(args.output)
    print(f"{args.source}: {layout} -> {args.output} ({', '.join(BACKBONE_LAYERS)}); "
          f"input normalization pixel_mean={stats['pixel_mean']} pixel_std={stats['pixel_std']}")


# --- Trained SSD detectors of the peers (see shared/peers/trained_weights.md for the sources). ---

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
# COCO's category ids run 1..90 with these 10 unused; torchvision's COCO model has a logit for
# each id and names the unused ones "N/A".
COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in COCO_UNUSED_IDS)
COCO_SCALES_300 = dict(min_sizes=(21, 45, 99, 153, 207, 261), max_sizes=(45, 99, 153, 207, 261, 315))
PEER_FORMATS = ("torchvision", "ssd.pytorch", "lufficc", "mmdet")


@dataclasses.dataclass(frozen=True)
class PeerDetector:
    """What defines a peer's detector beyond its weights (trained_weights.md, one per file)."""

    image_size: int
    priors: PriorConfig
    class_names: tuple[str, ...]
    label_ids: tuple[int, ...]
    pixel_mean: tuple[float, float, float]
    inference: InferenceConfig


def _voc_or_coco(format_name: str, num_classes: int, coco_classes: int):
    if num_classes == len(VOC_CLASSES):
        return "voc"
    if num_classes == coco_classes:
        return "coco"
    raise ValueError(f"this {format_name} checkpoint has {num_classes} object classes; the "
                     f"converter knows its VOC ({len(VOC_CLASSES)}) and COCO ({coco_classes}) "
                     "models, whose default boxes are published (others depend on their "
                     "training config)")


def peer_detector(format_name: str, image_size: int, num_classes: int) -> PeerDetector:
    """The priors, classes, pixel statistics and inference settings of a peer's published
    SSD`image_size` with `num_classes` object classes."""
    ssd = {300: SSD300, 512: SSD512}[image_size]
    if format_name == "torchvision":
        if (image_size, num_classes) != (300, 90):
            raise ValueError("torchvision publishes only SSD300 COCO (90 category ids), got "
                             f"SSD{image_size} with {num_classes} classes")
        names = tuple(COCO_CLASSES[COCO_CATEGORY_IDS.index(i)] if i in COCO_CATEGORY_IDS
                      else "N/A" for i in range(1, 91))
        return PeerDetector(
            300, dataclasses.replace(SSD300, clip="wh", **COCO_SCALES_300), names,
            tuple(range(1, 91)), tuple(255 * m for m in (0.48235, 0.45882, 0.40784)),
            InferenceConfig(pre_nms_top_k=400, top_k=200, resize="float"))
    if format_name == "ssd.pytorch":
        if (image_size, num_classes) != (300, 20):
            raise ValueError("ssd.pytorch publishes only SSD300 VOC (20 classes), got "
                             f"SSD{image_size} with {num_classes} classes")
        return PeerDetector(300, dataclasses.replace(SSD300, clip="center_form"), VOC_CLASSES,
                            tuple(range(1, 21)), (123.0, 117.0, 104.0), InferenceConfig(
                                pre_nms_top_k=200, top_k=None, clip_boxes=False,
                                resize="opencv"))
    if format_name == "lufficc":
        dataset = _voc_or_coco(format_name, num_classes, len(COCO_CLASSES))
        scales = {
            (300, "voc"): {},
            (300, "coco"): COCO_SCALES_300,
            (512, "voc"): dict(max_sizes=SSD512.max_sizes[:-1] + (537.65,)),
            (512, "coco"): dict(
                min_sizes=(20.48, 51.2, 133.12, 215.04, 296.96, 378.88, 460.8),
                max_sizes=(51.2, 133.12, 215.04, 296.96, 378.88, 460.8, 542.72)),
        }[(image_size, dataset)]
        names = VOC_CLASSES if dataset == "voc" else COCO_CLASSES
        return PeerDetector(image_size, dataclasses.replace(ssd, clip="center_form", **scales),
                            names, tuple(range(1, num_classes + 1)), (123.0, 117.0, 104.0),
                            InferenceConfig(pre_nms_top_k=None, top_k=100, clip_boxes=False,
                                            resize="opencv"))
    if format_name == "mmdet":
        dataset = _voc_or_coco(format_name, num_classes, len(COCO_CLASSES))
        scales = {  # SSDAnchorGenerator's sizes, truncated to integers
            (300, "voc"): {},
            (300, "coco"): COCO_SCALES_300,
            (512, "voc"): dict(min_sizes=(35, 76, 153, 230, 307, 384, 460),
                               max_sizes=(76, 153, 230, 307, 384, 460, 537)),
            (512, "coco"): dict(min_sizes=(20, 51, 133, 215, 296, 378, 460),
                                max_sizes=(51, 133, 215, 296, 378, 460, 542)),
        }[(image_size, dataset)]
        names = VOC_CLASSES if dataset == "voc" else COCO_CLASSES
        return PeerDetector(image_size, dataclasses.replace(ssd, clip="none", **scales), names,
                            tuple(range(num_classes)), IMAGENET_MEAN, InferenceConfig(
                                score_threshold=0.02, pre_nms_top_k=1000, top_k=200,
                                candidates="per_level", drop_empty_boxes=True,
                                resize="opencv"))
    raise ValueError(f"unknown format {format_name!r}, choose one of {PEER_FORMATS}")


def _peer_vgg_index(name: str) -> int:
    return dict(zip(BACKBONE_LAYERS, TORCH_CONV_INDICES + tuple(SSD_PYTORCH_FC_INDICES.values())))[name]


def peer_keys(format_name: str, config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Where each ssd_jax conv ("backbone/conv1_1", "extras/conv8_2", "loc/conv4_3", ...) and
    "l2norm/scale" are in a peer's state dict: the key prefix of its .weight and .bias (the
    full key for l2norm), with alternatives where the peer has renamed them (mmdetection)."""
    extras = [layer.name for layer in config.extras if isinstance(layer, Conv)]
    keys = {}
    if format_name == "torchvision":
        for name, index in zip(VGG16_CONVS[:10], TORCH_CONV_INDICES):
            keys[f"backbone/{name}"] = (f"backbone.features.{index}",)
        for name, index in zip(VGG16_CONVS[10:], (1, 3, 5)):
            keys[f"backbone/{name}"] = (f"backbone.extra.0.{index}",)
        keys["backbone/conv6"] = ("backbone.extra.0.7.1",)
        keys["backbone/conv7"] = ("backbone.extra.0.7.3",)
        for k, name in enumerate(extras):
            keys[f"extras/{name}"] = (f"backbone.extra.{k // 2 + 1}.{2 * (k % 2)}",)
        keys["l2norm/scale"] = ("backbone.scale_weight",)
        heads = ("head.regression_head.module_list.{}",), ("head.classification_head.module_list.{}",)
    else:
        vgg, extra, l2norm, heads = {
            "ssd.pytorch": ("vgg.", ("extras.{k}",), ("L2Norm.weight",),
                            (("loc.{}",), ("conf.{}",))),
            "lufficc": ("backbone.vgg.", ("backbone.extras.{k}",), ("backbone.l2_norm.weight",),
                        (("box_head.predictor.reg_headers.{}",),
                         ("box_head.predictor.cls_headers.{}",))),
            "mmdet": ("backbone.features.",
                      ("neck.extra_layers.{pair}.{member}.conv", "backbone.extra.{k}"),
                      ("neck.l2_norm.weight", "backbone.l2_norm.weight"),
                      (("bbox_head.reg_convs.{}.0", "bbox_head.reg_convs.{}"),
                       ("bbox_head.cls_convs.{}.0", "bbox_head.cls_convs.{}"))),
        }[format_name]
        for name in BACKBONE_LAYERS:
            keys[f"backbone/{name}"] = (f"{vgg}{_peer_vgg_index(name)}",)
        for k, name in enumerate(extras):
            keys[f"extras/{name}"] = tuple(key.format(k=k, pair=k // 2, member=k % 2)
                                           for key in extra)
        keys["l2norm/scale"] = l2norm
    for i, source in enumerate(config.sources):
        keys[f"loc/{source}"] = tuple(key.format(i) for key in heads[0])
        keys[f"conf/{source}"] = tuple(key.format(i) for key in heads[1])
    return keys


def _present(state: dict, alternatives: tuple[str, ...], suffix: str, format_name: str) -> str:
    for key in alternatives:
        if key + suffix in state:
            return key + suffix
    raise ValueError(f"the state dict has no {' or '.join(k + suffix for k in alternatives)}: "
                     f"not a {format_name} SSD checkpoint of this layout (its keys begin "
                     f"{sorted(state)[:4]})")


def _detect_size(format_name: str, state: dict) -> int:
    """300 or 512, from the extra layers the state dict has (conv12 exists in SSD512 only)."""
    conv12 = {"lufficc": ("backbone.extras.8.weight",),
              "mmdet": ("neck.extra_layers.4.0.conv.weight", "backbone.extra.8.weight")}
    return 512 if any(key in state for key in conv12.get(format_name, ())) else 300


def convert_detector(format_name: str, state: dict):
    """A peer's trained SSD state dict -> (SSD model, PeerDetector).

    Every ssd_jax parameter is taken from the key `peer_keys` names (OIHW kernels transposed
    to HWIO; mmdetection's background logit, its last, moved first in every box's class
    block). A missing key, a tensor of another shape than the stored geometry implies, or a
    tensor left over raises ValueError naming it.
    """
    if format_name not in PEER_FORMATS:
        raise ValueError(f"unknown format {format_name!r}, choose one of {PEER_FORMATS}")
    image_size = _detect_size(format_name, state)
    probe = get_config(f"ssd{image_size}")
    first_conf = _present(state, peer_keys(format_name, probe)[f"conf/{probe.sources[0]}"],
                          ".weight", format_name)
    boxes = probe.priors.boxes_per_location[0]
    num_classes = state[first_conf].shape[0] // boxes - 1
    peer = peer_detector(format_name, image_size, num_classes)
    config = get_config(f"ssd{image_size}", num_classes=num_classes, priors=peer.priors,
                        pixel_mean=peer.pixel_mean, pixel_std=(1.0, 1.0, 1.0))
    abstract = nnx.eval_shape(lambda: SSD(config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract)
    arrays, used = {}, set()
    for path, alternatives in peer_keys(format_name, config).items():
        group, name = path.split("/")
        if path == "l2norm/scale":
            key = _present(state, alternatives, "", format_name)
            arrays[("l2norm", "scale")] = (key, np.asarray(state[key], np.float32))
            used.add(key)
            continue
        for param, suffix, ndim in (("kernel", ".weight", 4), ("bias", ".bias", 1)):
            key = _present(state, alternatives, suffix, format_name)
            value = _tensor(state, key, ndim)
            if format_name == "mmdet" and group == "conf":
                value = _background_first(value, num_classes + 1)
            arrays[(group, name, param)] = (key, value.transpose(2, 3, 1, 0) if ndim == 4 else value)
            used.add(key)
    left_over = sorted(set(state) - used)
    if left_over:
        raise ValueError(f"{len(left_over)} tensors of the state dict have no place in "
                         f"{format_name} SSD{image_size}: {left_over[:5]}")
    pure = nnx.to_pure_dict(params)
    for where, (key, value) in arrays.items():
        slot = functools.reduce(lambda tree, k: tree[k], where[:-1], pure)
        want = tuple(slot[where[-1]].shape)
        if value.shape != want:
            raise ValueError(f"{key} has shape {_as_stored(value.shape)} but {format_name} "
                             f"SSD{image_size} with {num_classes} classes expects "
                             f"{_as_stored(want)} there ({'/'.join(where)})")
        slot[where[-1]] = jnp.asarray(value)
    nnx.replace_by_pure_dict(params, pure)
    return nnx.merge(graphdef, params), peer


def _as_stored(shape) -> tuple:
    """A converted array's shape as the peer stores it (kernels OIHW, not HWIO)."""
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape)


def _background_first(value: np.ndarray, classes: int) -> np.ndarray:
    """mmdetection's conf head, [A * (C + 1), ...] with the background last in each box's
    block, reordered so that the background comes first, as ssd_jax (and Caffe) have it."""
    if value.shape[0] % classes:
        raise ValueError(f"a conf head of {value.shape[0]} outputs is not a multiple of "
                         f"{classes} classes")
    blocks = value.reshape(value.shape[0] // classes, classes, *value.shape[1:])
    order = [classes - 1] + list(range(classes - 1))
    return blocks[:, order].reshape(value.shape)


def convert_detector_file(format_name: str, source, output) -> dict:
    """Converts a peer's checkpoint file (.pth or .npz) to a checkpoint directory `output`
    that `load_model`, `Detector.from_checkpoint` and evaluation read. Returns its record."""
    if Path(output).exists() and any(Path(output).iterdir()):
        raise ValueError(f"{output} exists and is not empty: choose a new folder")
    model, peer = convert_detector(format_name, read_state_dict(source))
    save_model(output, model, peer.class_names, label_ids=peer.label_ids,
               inference=peer.inference, source={"format": format_name, "file": Path(source).name})
    return checkpoint_meta(model.config, peer.class_names, label_ids=peer.label_ids,
                           inference=peer.inference)
