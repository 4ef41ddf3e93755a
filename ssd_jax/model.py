"""The SSD network (Liu et al. 2016, section 2.1 and fig. 2) in Flax NNX.

A VGG16 backbone, a few "extra" conv layers that halve the resolution, and on
each of several source feature maps two 3x3 conv heads: `loc` predicts 4 box
offsets and `conf` C + 1 class logits for every default box of every cell.

The architecture is data: a `ModelConfig` lists its layers (`Conv`, `MaxPool`)
in order, so SSD300, SSD512 and the small `ssd_mini` share one implementation,
and the config checks at construction that its feature maps have the sizes its
`PriorConfig` expects.

Parameter names follow the Caffe release (weiliu89/caffe, ssd_pascal.py) so an
ImageNet VGG16 converter can load by name:

  backbone/conv1_1 ... backbone/conv5_3   VGG16 convs ({kernel [3,3,I,O], bias [O]})
  backbone/conv6, backbone/conv7          VGG16 fc6/fc7 as convs (subsampled in
                                          the "fc_reduced" ImageNet model)
  extras/conv8_1 ... extras/conv11_2      (SSD512 also conv12_1, conv12_2)
  l2norm/scale                            [512] per-channel scale of conv4_3's L2Norm
  loc/<source>, conf/<source>             heads on each source map, e.g. loc/conv4_3

Kernels are HWIO (Caffe/PyTorch store OIHW: transpose (2, 3, 1, 0) when loading).
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reference.priors import SSD300, SSD300_COCO, SSD512, SSD512_COCO, PriorConfig
from ssd_jax import platform

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Conv:
    """A square conv followed by ReLU; `name` is its parameter name."""

    name: str
    features: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1

    def output_size(self, size: int) -> int:
        span = size + 2 * self.padding - self.dilation * (self.kernel - 1) - 1
        return span // self.stride + 1


@dataclasses.dataclass(frozen=True)
class MaxPool:
    """A square max pool. `ceil_mode` rounds the output size up, as Caffe does
    (SSD300's pool3 maps 75 -> 38): the missing bottom/right cells are padded with -inf."""

    window: int = 2
    stride: int = 2
    padding: int = 0
    ceil_mode: bool = False

    def output_size(self, size: int) -> int:
        span = size + 2 * self.padding - self.window
        rounding = math.ceil if self.ceil_mode else math.floor
        return rounding(span / self.stride) + 1

    def extra_padding(self, size: int) -> int:
        """Bottom/right padding that makes a VALID pool give `output_size`."""
        needed = (self.output_size(size) - 1) * self.stride + self.window
        return needed - (size + 2 * self.padding)


Layer = Conv | MaxPool


def conv_output_shapes(layers: tuple[Layer, ...], image_size: int) -> dict[str, tuple[int, int]]:
    """(side, channels) of each conv layer's output, by layer name."""
    size, shapes = image_size, {}
    for layer in layers:
        size = layer.output_size(size)
        if isinstance(layer, Conv):
            shapes[layer.name] = (size, layer.features)
    return shapes


def _vgg16() -> tuple[Layer, ...]:
    """VGG16 conv1_1..conv5_3, then pool5 (3x3, stride 1) and fc6/fc7 as conv6
    (3x3, dilation 6) and conv7 (1x1), as in the paper's section 3 ("atrous").
    Caffe's pools round up; only pool3 of SSD300 (75 -> 38) sees an odd size."""
    layers = []
    blocks = [(2, 64), (2, 128), (3, 256), (3, 512), (3, 512)]  # (convs, channels)
    for block, (repeat, features) in enumerate(blocks, 1):
        layers += [Conv(f"conv{block}_{i}", features) for i in range(1, repeat + 1)]
        if block < 5:
            layers.append(MaxPool(ceil_mode=True))
    return tuple(layers) + (
        MaxPool(window=3, stride=1, padding=1),
        Conv("conv6", 1024, kernel=3, padding=6, dilation=6),
        Conv("conv7", 1024, kernel=1, padding=0),
    )


def _extra_pair(index: int, squeeze: int, features: int, **conv3x3) -> tuple[Conv, Conv]:
    """One extra block: a 1x1 conv that narrows, then a conv (3x3 by default) that shrinks."""
    return (Conv(f"conv{index}_1", squeeze, kernel=1, padding=0),
            Conv(f"conv{index}_2", features, **conv3x3))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that defines an SSD network.

    Attributes:
      name: registry name, e.g. "ssd300".
      priors: default-box geometry; its image_size is the model's input side and
        its feature_map_sizes must be the sizes of the `sources` maps.
      num_classes: C object classes; the conf head outputs C + 1 logits (0 = background).
      backbone: layers up to the part an ImageNet classifier provides (VGG16 through conv7).
      extras: the layers SSD adds after the backbone.
      sources: names of the conv layers whose outputs feed the heads, largest map first.
      l2norm_source: the source normalized by L2Norm before its heads (conv4_3), or None.
      dtype: compute dtype, "float32" or "bfloat16". Parameters are always float32
        and outputs are returned as float32.
      pixel_mean, pixel_std: RGB statistics on the 0..255 scale used to normalize inputs.
      cpu_convolutions: how the convolutions run on a CPU (`platform.CPU_CONVOLUTIONS`):
        "onednn", oneDNN's where it is installed (`ssd_jax.onednn`), else XLA's, with
        oneDNN's Winograd algorithm for the 3x3 stride-1 convolutions; "onednn_direct", the
        same with oneDNN's direct algorithm throughout; "xla", XLA's always. The same network
        each way, up to float32 rounding.
    """

    name: str
    priors: PriorConfig
    num_classes: int
    backbone: tuple[Layer, ...]
    extras: tuple[Layer, ...]
    sources: tuple[str, ...]
    l2norm_source: str | None = None
    dtype: str = "float32"
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    cpu_convolutions: str = "onednn"

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (object classes), got {self.num_classes}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.cpu_convolutions not in platform.CPU_CONVOLUTIONS:
            raise ValueError("cpu_convolutions must be one of "
                             f"{sorted(platform.CPU_CONVOLUTIONS)}, got {self.cpu_convolutions!r}")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ValueError("pixel_mean and pixel_std need 3 (RGB) values, std > 0, "
                             f"got {self.pixel_mean}, {self.pixel_std}")
        if self.l2norm_source is not None and self.l2norm_source not in self.sources:
            raise ValueError(f"l2norm_source {self.l2norm_source!r} is not one of {self.sources}")
        sizes = tuple(size for size, _ in self.source_shapes())
        if sizes != tuple(self.priors.feature_map_sizes):
            raise ValueError(f"{self.name}: the source maps {self.sources} have sizes {sizes} "
                             f"but the priors expect {self.priors.feature_map_sizes}")

    @property
    def layers(self) -> tuple[Layer, ...]:
        return self.backbone + self.extras

    def source_shapes(self) -> list[tuple[int, int]]:
        """(side, channels) of each source map, computed from the layer list."""
        shapes = conv_output_shapes(self.layers, self.priors.image_size)
        missing = [name for name in self.sources if name not in shapes]
        if missing:
            raise ValueError(f"sources {missing} name no conv layer of {self.name}")
        return [shapes[name] for name in self.sources]


def ssd300(num_classes: int = 20, dtype: str = "float32", **overrides) -> ModelConfig:
    """SSD300 of the Caffe release: 6 source maps 38, 19, 10, 5, 3, 1 and 8732 priors."""
    config = ModelConfig(
        name="ssd300", priors=SSD300, num_classes=num_classes, dtype=dtype,
        backbone=_vgg16(),
        extras=(_extra_pair(8, 256, 512, stride=2) + _extra_pair(9, 128, 256, stride=2)
                + _extra_pair(10, 128, 256, padding=0) + _extra_pair(11, 128, 256, padding=0)),
        sources=("conv4_3", "conv7", "conv8_2", "conv9_2", "conv10_2", "conv11_2"),
        l2norm_source="conv4_3")
    return dataclasses.replace(config, **overrides)


def ssd512(num_classes: int = 20, dtype: str = "float32", **overrides) -> ModelConfig:
    """SSD512 of the Caffe release: 7 source maps 64, ..., 1 and 24564 priors."""
    config = ModelConfig(
        name="ssd512", priors=SSD512, num_classes=num_classes, dtype=dtype,
        backbone=_vgg16(),
        extras=(_extra_pair(8, 256, 512, stride=2) + _extra_pair(9, 128, 256, stride=2)
                + _extra_pair(10, 128, 256, stride=2) + _extra_pair(11, 128, 256, stride=2)
                + _extra_pair(12, 128, 256, kernel=4, padding=1)),
        sources=("conv4_3", "conv7", "conv8_2", "conv9_2", "conv10_2", "conv11_2", "conv12_2"),
        l2norm_source="conv4_3")
    return dataclasses.replace(config, **overrides)


def ssd_mini(num_classes: int = 3, image_size: int = 128, dtype: str = "float32",
             widths: tuple[int, int, int, int] = (16, 32, 64, 96), s_min: float = 0.1,
             s_max: float = 0.7, **overrides) -> ModelConfig:
    """A small VGG-style SSD that trains from scratch on a CPU (synthetic shapes).

    Plain conv + ReLU like VGG (no normalization layers, so no batch statistics),
    down to stride 8 with one conv per block, then stride-2 convs down to 1x1.
    conv1_1 has stride 2 instead of being followed by pool1: a full-resolution
    conv and its gradient cost as much as the rest of the network on a CPU.
    At image_size 128 the source maps are 16, 8, 4, 2, 1 (cell steps 8..128 px)
    with 1524 priors; scales follow the paper's formula from s_min (0.1: 12.8 px
    boxes) to s_max (0.7: 90 px), the object sizes of `ssd_jax.data.shapes`
    (sides from 8% to 70% of the image).
    """
    w1, w2, w3, w4 = widths
    backbone = (Conv("conv1_1", w1, stride=2), Conv("conv2_1", w2), MaxPool(ceil_mode=True),
                Conv("conv3_1", w3), MaxPool(ceil_mode=True), Conv("conv4_1", w4),
                Conv("conv4_2", w4), Conv("conv5_1", w4, stride=2))
    extras = (_extra_pair(6, w4 // 2, w4, stride=2) + _extra_pair(7, w4 // 2, w4, stride=2)
              + _extra_pair(8, w4 // 2, w4, stride=2))
    sources = ("conv4_2", "conv5_1", "conv6_2", "conv7_2", "conv8_2")
    # Map sizes from the layer list itself, so any image_size gets consistent priors.
    shapes = conv_output_shapes(backbone + extras, image_size)
    priors = PriorConfig.from_paper(
        image_size, [shapes[name][0] for name in sources],
        aspect_ratios=((2,), (2, 3), (2, 3), (2,), (2,)), s_min=s_min, s_max=s_max)
    config = ModelConfig(name="ssd_mini", priors=priors, num_classes=num_classes, dtype=dtype,
                         backbone=backbone, extras=extras, sources=sources)
    return dataclasses.replace(config, **overrides)


def ssd300_coco(num_classes: int = 80, dtype: str = "float32", **overrides) -> ModelConfig:
    """SSD300 with the Caffe release's COCO default boxes (reference.priors.SSD300_COCO)."""
    return ssd300(num_classes, dtype, **{"name": "ssd300_coco", "priors": SSD300_COCO,
                                         **overrides})


def ssd512_coco(num_classes: int = 80, dtype: str = "float32", **overrides) -> ModelConfig:
    """SSD512 with the COCO default boxes of the paper (reference.priors.SSD512_COCO)."""
    return ssd512(num_classes, dtype, **{"name": "ssd512_coco", "priors": SSD512_COCO,
                                         **overrides})


CONFIGS = {"ssd300": ssd300, "ssd512": ssd512, "ssd_mini": ssd_mini,
           "ssd300_coco": ssd300_coco, "ssd512_coco": ssd512_coco}


def get_config(name: str, **overrides) -> ModelConfig:
    """The config registered under `name`, built with keyword `overrides`
    (e.g. get_config("ssd300", num_classes=20, dtype="bfloat16"))."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}, choose one of {sorted(CONFIGS)}")
    return CONFIGS[name](**overrides)


class L2Norm(nnx.Module):
    """ParseNet's L2 normalization (paper section 3.1): each cell's channel vector is
    scaled to unit L2 norm, then by a learned per-channel scale initialized to 20."""

    def __init__(self, features: int, scale: float = 20.0, eps: float = 1e-10):
        self.scale = nnx.Param(jnp.full((features,), scale, jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)  # a sum of 512 squares is too coarse in bfloat16
        # ssd.pytorch divides by sqrt(sum) + eps; clamping the sum at eps^2 instead keeps
        # the gradient of an all-zero ReLU vector finite (sqrt'(0) is inf, inf * 0 = NaN).
        squared = jnp.maximum(jnp.sum(x32 * x32, axis=-1, keepdims=True), self.eps ** 2)
        return (x32 * jax.lax.rsqrt(squared) * self.scale[...]).astype(x.dtype)


class SSD(nnx.Module):
    """SSD detector: images -> (loc offsets, class logits) for every prior.

    Parameters live in `backbone`, `extras` (nnx.Dict by layer name), `l2norm`,
    `loc` and `conf` (nnx.Dict by source name); see the module docstring.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        convs, channels = {}, 3
        for layer in config.layers:
            if isinstance(layer, Conv):
                convs[layer.name] = _conv(config, channels, layer, rngs)
                channels = layer.features
        self.backbone = nnx.Dict({name: convs[name] for name in _conv_names(config.backbone)})
        self.extras = nnx.Dict({name: convs[name] for name in _conv_names(config.extras)})
        source_channels = dict(zip(config.sources, (c for _, c in config.source_shapes())))
        self.l2norm = (L2Norm(source_channels[config.l2norm_source])
                       if config.l2norm_source is not None else None)

        def heads(values_per_box):
            return nnx.Dict({
                name: _conv(config, source_channels[name], Conv(name, n * values_per_box), rngs)
                for name, n in zip(config.sources, config.priors.boxes_per_location)})

        self.loc = heads(4)
        self.conf = heads(config.num_classes + 1)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Predicts box offsets and class logits for every prior.

        Args:
          images: [B, H, W, 3] RGB pixel values in 0..255 (uint8 or float),
            H = W = config.priors.image_size.

        Returns:
          loc: [B, P, 4] float32 offsets from the priors, to be decoded with
            `encoding.decode` (variances (0.1, 0.2)).
          conf_logits: [B, P, C + 1] float32 logits, class 0 = background.
          P is ordered as `reference.priors.prior_boxes(config.priors)`: map by map,
          then cell row-major (y, then x), then the boxes of the cell.
        """
        x = self.normalize(images)
        sources = {}
        for layer in self.config.layers:
            x = self._apply(layer, x)
            if getattr(layer, "name", None) in self.config.sources:
                sources[layer.name] = x
        if self.l2norm is not None:
            sources[self.config.l2norm_source] = self.l2norm(sources[self.config.l2norm_source])
        loc = [flatten_head(self.loc[name](sources[name]), 4) for name in self.config.sources]
        conf = [flatten_head(self.conf[name](sources[name]), self.config.num_classes + 1)
                for name in self.config.sources]
        return (jnp.concatenate(loc, axis=1).astype(jnp.float32),
                jnp.concatenate(conf, axis=1).astype(jnp.float32))

    def normalize(self, images: jax.Array) -> jax.Array:
        """[B, S, S, 3] pixels in 0..255 -> standardized, in the compute dtype."""
        images, size = jnp.asarray(images), self.config.priors.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (size, size, 3):
            raise ValueError(f"{self.config.name} takes images of shape [B, {size}, {size}, 3] "
                             f"(NHWC RGB), got {tuple(images.shape)}")
        if not any(jnp.issubdtype(images.dtype, kind) for kind in (jnp.integer, jnp.floating)):
            raise ValueError(f"images must hold integer or float pixel values, got {images.dtype}")
        mean = np.asarray(self.config.pixel_mean, np.float32)
        std = np.asarray(self.config.pixel_std, np.float32)
        return ((images.astype(jnp.float32) - mean) / std).astype(DTYPES[self.config.dtype])

    def _apply(self, layer: Layer, x: jax.Array) -> jax.Array:
        if isinstance(layer, Conv):
            convs = self.backbone if layer.name in self.backbone else self.extras
            return jax.nn.relu(convs[layer.name](x))
        extra = layer.extra_padding(x.shape[1])
        if layer.window == layer.stride and layer.padding == 0:
            return _tiled_max_pool(x, layer.window, extra)
        pad = [(layer.padding, layer.padding + extra)] * 2
        return nnx.max_pool(x, (layer.window,) * 2, strides=(layer.stride,) * 2, padding=pad)


def create_ssd(config: ModelConfig, seed: int = 0) -> SSD:
    """`SSD(config, rngs=nnx.Rngs(seed))`, its initial weights drawn by one compiled program:
    the same bits (tested), in a fraction of the time.

    Why: built eagerly, each weight's random draw of a new shape compiles an XLA program of its
    own, 32 for ssd_mini (4.4 of the 5.1 s that SSD took to build on 2 cores). One program,
    compiled on a CPU without LLVM's optimizations (`platform.run_once_compiler_options`),
    built ssd_mini in 1.7 to 1.8 s and SSD300 in 3.3 to 3.7 s instead of 5.5 to 6.1 and 14.4
    to 15.3 s (2 cores, one process each; one program with the default optimizations: 6.9
    and 10.0 s). The program is kept per (config, seed), so building the same model again in
    one process compiles nothing, as the eager constructor's cached draws did.
    """
    options = tuple(sorted(platform.run_once_compiler_options().items()))
    return nnx.merge(*_weight_draw(options)(config, seed))


@functools.cache
def _weight_draw(compiler_options: tuple):
    """The jitted `(config, seed) -> nnx.split(SSD(config, rngs=nnx.Rngs(seed)))`, both
    arguments static, compiled with `compiler_options` ((name, value) pairs)."""
    return jax.jit(lambda config, seed: nnx.split(SSD(config, rngs=nnx.Rngs(seed))),
                   static_argnums=(0, 1), compiler_options=dict(compiler_options))


def _conv(config: ModelConfig, in_features: int, layer: Conv, rngs: nnx.Rngs) -> nnx.Conv:
    """The nnx.Conv of `layer`: Xavier-uniform kernel and zero bias as in ssd.pytorch,
    float32 parameters, computing in config.dtype (on a CPU, by oneDNN or by XLA with its own
    kernel gradient, as config.cpu_convolutions says: `platform.conv_general_dilated`)."""
    return nnx.Conv(
        in_features, layer.features, (layer.kernel,) * 2, strides=layer.stride,
        padding=[(layer.padding, layer.padding)] * 2, kernel_dilation=layer.dilation,
        dtype=DTYPES[config.dtype], param_dtype=jnp.float32,
        kernel_init=nnx.initializers.xavier_uniform(), bias_init=nnx.initializers.zeros,
        conv_general_dilated=platform.CPU_CONVOLUTIONS[config.cpu_convolutions], rngs=rngs)


def _tiled_max_pool(x: jax.Array, window: int, extra: int) -> jax.Array:
    """A max pool whose windows tile the map (stride = window, no padding but `extra`
    -inf rows and columns at the bottom/right), as a reshape and a max.

    Same values and gradients as `nnx.max_pool`, ties included (`_max_over_tiles`). XLA's
    CPU backend turns the gradient of a reduce-window into a variadic reduce-window over
    materialized index arrays, ~6% of SSD300's train step in a CPU profile.
    """
    x = jnp.pad(x, ((0, 0), (0, extra), (0, extra), (0, 0)), constant_values=-jnp.inf)
    batch, height, width, channels = x.shape
    return _max_over_tiles(x.reshape(batch, height // window, window, width // window, window,
                                     channels))


@jax.custom_vjp
def _max_over_tiles(tiles: jax.Array) -> jax.Array:
    """[B, H, w, W, w, C] tiles -> [B, H, W, C], the max of each w x w tile.

    The gradient goes to the first maximum of a tile in row-major order, as for lax's
    reduce-window max. Why not `tiles.max`'s own gradient: it splits a tie between the tied
    elements, and counting them is a sum over the tile axes that cost more than the
    convolutions around it in ssd_mini's CPU profile (9 ms of a 106 ms step).
    """
    return tiles.max(axis=(2, 4))


def _max_over_tiles_forward(tiles):
    pooled = tiles.max(axis=(2, 4))
    return pooled, (tiles, pooled)


def _max_over_tiles_backward(residuals, gradient):
    tiles, pooled = residuals
    window = tiles.shape[2]
    taken = jnp.zeros(pooled.shape, bool)  # tiles whose maximum has had the gradient
    rows = []
    for i in range(window):  # static: the w * w positions of a tile, unrolled at trace time
        row = []
        for j in range(window):
            first = ~taken & (tiles[:, :, i, :, j, :] == pooled)
            taken = taken | first
            row.append(jnp.where(first, gradient, 0))
        rows.append(jnp.stack(row, axis=3))
    return (jnp.stack(rows, axis=2),)


_max_over_tiles.defvjp(_max_over_tiles_forward, _max_over_tiles_backward)


def _conv_names(layers: tuple[Layer, ...]) -> list[str]:
    return [layer.name for layer in layers if isinstance(layer, Conv)]


def flatten_head(x: jax.Array, values_per_box: int) -> jax.Array:
    """[B, f, f, n * values_per_box] head output -> [B, f * f * n, values_per_box].

    NHWC memory order is row, column, box, value: exactly the prior order
    (cell row-major, then the boxes of the cell), so a reshape suffices.
    """
    return x.reshape(x.shape[0], -1, values_per_box)


def count_params(model: nnx.Module) -> int:
    """Number of scalars in the model's nnx.Param leaves (works on nnx.eval_shape models)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
