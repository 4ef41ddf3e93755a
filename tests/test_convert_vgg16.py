"""VGG16 weight conversion: fake torchvision / ssd.pytorch state dicts (NumPy, no torch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import convert_vgg16
from ssd_jax import convert
from ssd_jax.model import IMAGENET_MEAN, IMAGENET_STD, SSD, ssd300, ssd_mini

# Real VGG16 conv widths, and tiny ones for the torchvision layout, whose full-size fc6 alone is
# 4096 x 25088 floats.
VGG16_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
TINY_WIDTHS = (3, 4, 5, 5, 6, 6, 6, 7, 7, 7, 8, 8, 8)
TINY_FC = 20  # fc6/fc7 units: 4096 in the real network


def _conv_state(rng, widths, prefix):
    state, channels = {}, 3
    for index, width in zip(convert.TORCH_CONV_INDICES, widths):
        state[f"{prefix}{index}.weight"] = rng.standard_normal((width, channels, 3, 3), np.float32)
        state[f"{prefix}{index}.bias"] = rng.standard_normal(width, np.float32)
        channels = width
    return state


def torchvision_state(rng, widths=TINY_WIDTHS, fc=TINY_FC):
    state = _conv_state(rng, widths, "features.")
    for index, shape in ((0, (fc, widths[-1] * 7 * 7)), (3, (fc, fc)), (6, (10, fc))):
        state[f"classifier.{index}.weight"] = rng.standard_normal(shape, np.float32)
        state[f"classifier.{index}.bias"] = rng.standard_normal(shape[0], np.float32)
    return state


def ssd_pytorch_state(rng):
    state = _conv_state(rng, VGG16_WIDTHS, "")
    for index, shape in ((31, (1024, 512, 3, 3)), (33, (1024, 1024, 1, 1))):
        state[f"{index}.weight"] = rng.standard_normal(shape, np.float32)
        state[f"{index}.bias"] = rng.standard_normal(shape[0], np.float32)
    return state


def _hwio(oihw):
    return np.transpose(oihw, (2, 3, 1, 0))


def _zero_model(config):
    """An SSD with zero parameters, built without running the (slow) initializers."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: SSD(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state))


@pytest.fixture(scope="module")
def caffe_files(tmp_path_factory):
    """A full-size ssd.pytorch-layout state dict (.npz) and its converted weight file."""
    folder = tmp_path_factory.mktemp("vgg")
    state = ssd_pytorch_state(np.random.default_rng(1))
    np.savez(folder / "vgg16_reducedfc.npz", **state)
    convert.convert_file(folder / "vgg16_reducedfc.npz", folder / "weights.npz")
    return state, folder / "weights.npz"


@pytest.fixture(scope="module")
def caffe_model(caffe_files):
    """SSD300 with the Caffe backbone loaded, normalizing pixels as the weight file says."""
    model = _zero_model(ssd300(**convert.backbone_pixel_stats(caffe_files[1])))
    convert.load_backbone_weights(model, caffe_files[1])
    return model


def test_torchvision_layout_transposes_convs_and_subsamples_fc6_fc7(tmp_path):
    state = torchvision_state(np.random.default_rng(0))
    np.savez(tmp_path / "vgg16.npz", **state)
    convert_vgg16.main([str(tmp_path / "vgg16.npz"), str(tmp_path / "out.npz")])
    layers, stats = convert.read_backbone_weights(tmp_path / "out.npz")
    assert set(layers) == set(convert.BACKBONE_LAYERS)
    assert stats == {"pixel_mean": IMAGENET_MEAN, "pixel_std": IMAGENET_STD}
    for name, index in zip(convert.VGG16_CONVS, convert.TORCH_CONV_INDICES):
        weight = state[f"features.{index}.weight"]
        np.testing.assert_array_equal(layers[name]["kernel"], _hwio(weight))
        np.testing.assert_array_equal(layers[name]["bias"], state[f"features.{index}.bias"])
        o, i, h, w = (s - 1 for s in weight.shape)  # one entry by hand: HWIO[h, w, i, o]
        assert layers[name]["kernel"][h, w, i, o] == weight[o, i, h, w]

    fc6, fc6_bias = state["classifier.0.weight"], state["classifier.0.bias"]
    conv6 = layers["conv6"]["kernel"]
    channels = TINY_WIDTHS[-1]
    assert conv6.shape == (3, 3, channels, TINY_FC // 4)
    for h, w, i, o in np.ndindex(conv6.shape):  # fc6 inputs are flattened (channel, row, column)
        assert conv6[h, w, i, o] == fc6[4 * o, i * 49 + (3 * h) * 7 + 3 * w]
    assert conv6[2, 1, 3, 4] == fc6[16, 3 * 49 + 6 * 7 + 3]
    np.testing.assert_array_equal(layers["conv6"]["bias"], fc6_bias[[0, 4, 8, 12, 16]])

    fc7 = state["classifier.3.weight"]
    conv7 = layers["conv7"]["kernel"]
    assert conv7.shape == (1, 1, TINY_FC // 4, TINY_FC // 4)
    for i, o in np.ndindex(conv7.shape[2:]):
        assert conv7[0, 0, i, o] == fc7[4 * o, 4 * i]
    np.testing.assert_array_equal(layers["conv7"]["bias"], state["classifier.3.bias"][::4])


def test_torchvision_fc6_of_full_vgg16_reduces_to_ssd_conv6_shape():
    """The reduction on the real widths (shapes only: a [4096, 25088] fc6 is 400 MB)."""
    fc6 = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (4096, 512 * 49), (0, 0))
    kernel, bias = convert.reduce_fc6(fc6, np.zeros(4096, np.float32), in_channels=512)
    assert kernel.shape == (1024, 512, 3, 3) and bias.shape == (1024,)
    kernel, bias = convert.reduce_fc7(fc6[:, :4096], np.zeros(4096, np.float32))
    assert kernel.shape == (1024, 1024, 1, 1) and bias.shape == (1024,)
    with pytest.raises(ValueError, match="fc6"):
        convert.reduce_fc6(fc6[:, :1000], np.zeros(4096, np.float32), in_channels=512)


def test_ssd_pytorch_weights_load_into_every_ssd300_backbone_layer(caffe_files, caffe_model):
    state, _ = caffe_files
    indices = dict(zip(convert.VGG16_CONVS, convert.TORCH_CONV_INDICES),
                   **convert.SSD_PYTORCH_FC_INDICES)
    assert set(caffe_model.backbone.keys()) == set(indices)
    for name, index in indices.items():
        expected = state[f"{index}.weight"]
        if name == "conv1_1":
            expected = expected[:, ::-1]  # BGR input channels -> RGB
        conv = caffe_model.backbone[name]
        np.testing.assert_array_equal(conv.kernel[...], _hwio(expected), err_msg=name)
        np.testing.assert_array_equal(conv.bias[...], state[f"{index}.bias"], err_msg=name)
    assert not np.any(caffe_model.extras["conv8_1"].kernel[...])  # only the backbone is loaded


def test_caffe_weights_on_rgb_input_match_caffe_bgr_mean_subtracted_activations(
        caffe_files, caffe_model):
    state, _ = caffe_files
    image = np.random.default_rng(2).integers(0, 256, (1, 300, 300, 3), np.uint8)
    ours = caffe_model.backbone["conv1_1"](caffe_model.normalize(image))
    # Caffe: BGR pixels minus the BGR mean, NCHW, OIHW kernel, zero padding 1.
    bgr = image[..., ::-1].astype(np.float32) - np.float32(convert.CAFFE_MEAN_BGR)
    caffe = jax.lax.conv_general_dilated(
        bgr.transpose(0, 3, 1, 2), state["0.weight"], (1, 1), [(1, 1), (1, 1)],
        dimension_numbers=("NCHW", "OIHW", "NCHW"), precision="highest")
    caffe = np.asarray(caffe).transpose(0, 2, 3, 1) + state["0.bias"]
    np.testing.assert_allclose(ours, caffe, rtol=1e-5, atol=2e-3)
    assert caffe_model.config.pixel_mean == (123.0, 117.0, 104.0)
    assert caffe_model.config.pixel_std == (1.0, 1.0, 1.0)


def _rewrite(path, out, edit):
    with np.load(path) as arrays:
        arrays = {key: arrays[key] for key in arrays.files}
    edit(arrays)
    np.savez(out, **arrays)
    return out


def test_a_shape_mismatch_or_missing_layer_is_named_and_nothing_is_loaded(caffe_files, tmp_path):
    _, weights = caffe_files
    model = _zero_model(ssd300(**convert.backbone_pixel_stats(weights)))
    wrong = _rewrite(weights, tmp_path / "wrong.npz", lambda a: a.update(
        {"conv4_2/kernel": np.zeros((3, 3, 256, 512), np.float32)}))
    with pytest.raises(ValueError, match=r"conv4_2 kernel has shape \(3, 3, 256, 512\).*"
                                         r"\(3, 3, 512, 512\)"):
        convert.load_backbone_weights(model, wrong)
    missing = _rewrite(weights, tmp_path / "missing.npz",
                       lambda a: [a.pop(key) for key in ("conv7/kernel", "conv7/bias")])
    with pytest.raises(ValueError, match=r"missing from the file \['conv7'\]"):
        convert.load_backbone_weights(model, missing)
    assert not any(np.any(conv.kernel[...]) for conv in model.backbone.values())


def test_weights_for_other_pixel_statistics_or_another_backbone_are_refused(caffe_files):
    _, weights = caffe_files
    imagenet_model = nnx.eval_shape(lambda: SSD(ssd300(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="pixel_mean.*backbone_pixel_stats"):
        convert.load_backbone_weights(imagenet_model, weights)
    mini = nnx.eval_shape(lambda: SSD(ssd_mini(**convert.backbone_pixel_stats(weights)),
                                      rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="layers the model lacks.*conv1_2"):
        convert.load_backbone_weights(mini, weights)


def test_unknown_state_dicts_and_unreadable_files_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a VGG16 state dict"):
        convert.convert_state_dict({"layer.weight": np.zeros(3)})
    state = torchvision_state(np.random.default_rng(0))
    del state["classifier.3.bias"]
    with pytest.raises(ValueError, match="classifier.3.bias"):
        convert.convert_state_dict(state)
    with pytest.raises(FileNotFoundError, match="vgg16.pth does not exist"):
        convert.read_state_dict(tmp_path / "vgg16.pth")
    (tmp_path / "text.pth").write_text("not a pickle")
    with pytest.raises(ValueError, match="text.pth is not a PyTorch file"):
        convert.read_state_dict(tmp_path / "text.pth")
