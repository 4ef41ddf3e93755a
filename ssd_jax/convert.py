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

Either is read from a .pth (needs PyTorch, imported only then; it is no dependency of this
project) or from an .npz holding the same state dict (`numpy.savez(path, **state_dict)`).

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
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ssd_jax.model import IMAGENET_MEAN, IMAGENET_STD

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
    """A PyTorch state dict from a .pth / .pt (needs torch) or an .npz of the same keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            return {key: arrays[key] for key in arrays.files}
    try:
        import torch  # only to unpickle .pth files
    except ImportError:
        raise ImportError(
            f"reading {path} needs PyTorch (pip install torch; this project does not depend on "
            "it), or convert it to an .npz where torch is installed: "
            "numpy.savez(out, **{k: v.numpy() for k, v in state_dict.items()})") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {key: value.detach().numpy() for key, value in state.items()}


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
