"""Converting the peers' trained SSDs: fake state dicts with each peer's exact key names and
shapes (written with NumPy, no torch), every tensor checked where the map
(shared/peers/trained_weights.md) puts it, plus the geometry and settings each peer uses."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from experiments import convert_ssd
from reference.priors import prior_boxes
from ssd_jax.checkpoint import load_model
from ssd_jax.convert import COCO_CLASSES, convert_detector
from ssd_jax.data.voc import VOC_CLASSES
from ssd_jax.detector import Detector
from ssd_jax.model import SSD, get_config
from ssd_jax.pth import write_pth

VGG = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28, 31, 33)
BACKBONE = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
            "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3", "conv6", "conv7")
EXTRAS = {300: [f"conv{i}_{j}" for i in range(8, 12) for j in (1, 2)],
          512: [f"conv{i}_{j}" for i in range(8, 13) for j in (1, 2)]}
SOURCES = {300: ("conv4_3", "conv7", "conv8_2", "conv9_2", "conv10_2", "conv11_2"),
           512: ("conv4_3", "conv7", "conv8_2", "conv9_2", "conv10_2", "conv11_2", "conv12_2")}


def torchvision_map(size):
    """peer key prefix -> ssd_jax path, from the map's section 1.3."""
    keys = {f"backbone.features.{i}": f"backbone/{name}" for i, name in zip(VGG[:10], BACKBONE)}
    keys.update({f"backbone.extra.0.{i}": f"backbone/conv5_{j}" for i, j in ((1, 1), (3, 2), (5, 3))})
    keys.update({"backbone.extra.0.7.1": "backbone/conv6", "backbone.extra.0.7.3": "backbone/conv7"})
    for block in range(1, 5):
        keys[f"backbone.extra.{block}.0"] = f"extras/conv{block + 7}_1"
        keys[f"backbone.extra.{block}.2"] = f"extras/conv{block + 7}_2"
    keys["backbone.scale_weight"] = "l2norm/scale"
    for i, source in enumerate(SOURCES[size]):
        keys[f"head.regression_head.module_list.{i}"] = f"loc/{source}"
        keys[f"head.classification_head.module_list.{i}"] = f"conf/{source}"
    return keys


def vgg_list_map(size, vgg, extra, l2norm, loc, conf):
    """The ssd.pytorch-style layouts (sections 2.2, 3 and 4 of the map)."""
    keys = {f"{vgg}{i}": f"backbone/{name}" for i, name in zip(VGG, BACKBONE)}
    keys.update({extra(k): f"extras/{name}" for k, name in enumerate(EXTRAS[size])})
    keys[l2norm] = "l2norm/scale"
    for i, source in enumerate(SOURCES[size]):
        keys[loc.format(i)] = f"loc/{source}"
        keys[conf.format(i)] = f"conf/{source}"
    return keys


MAPS = {
    "torchvision": torchvision_map,
    "ssd.pytorch": lambda size: vgg_list_map(size, "vgg.", "extras.{}".format, "L2Norm.weight",
                                             "loc.{}", "conf.{}"),
    "lufficc": lambda size: vgg_list_map(
        size, "backbone.vgg.", "backbone.extras.{}".format, "backbone.l2_norm.weight",
        "box_head.predictor.reg_headers.{}", "box_head.predictor.cls_headers.{}"),
    "mmdet": lambda size: vgg_list_map(
        size, "backbone.features.", lambda k: f"neck.extra_layers.{k // 2}.{k % 2}.conv",
        "neck.l2_norm.weight", "bbox_head.reg_convs.{}.0", "bbox_head.cls_convs.{}.0"),
    "mmdet-legacy": lambda size: vgg_list_map(
        size, "backbone.features.", "backbone.extra.{}".format, "backbone.l2_norm.weight",
        "bbox_head.reg_convs.{}", "bbox_head.cls_convs.{}"),
}


def fake_state(layout, size, num_classes, seed=0):
    """(state dict, its map) of random tensors, PyTorch shapes (OIHW) of the map's model."""
    keys = MAPS[layout](size)
    shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: SSD(
        get_config(f"ssd{size}", num_classes=num_classes), rngs=nnx.Rngs(0)))))
    rng, state = np.random.default_rng(seed), {}
    for prefix, path in keys.items():
        group, name = path.split("/")
        if path == "l2norm/scale":
            state[prefix] = rng.random(512, dtype=np.float32)
            continue
        h, w, i, o = shapes[group][name]["kernel"].shape
        state[f"{prefix}.weight"] = rng.random((o, i, h, w), dtype=np.float32)
        state[f"{prefix}.bias"] = rng.random(o, dtype=np.float32)
    return state, keys


def background_first(value, classes):
    """The map's permutation for mmdetection: W.reshape(A, C + 1, ...)[:, [C, 0, ..., C-1]]."""
    blocks = value.reshape(-1, classes, *value.shape[1:])
    return blocks[:, [classes - 1, *range(classes - 1)]].reshape(value.shape)


def assert_every_tensor_lands_where_the_map_says(model, state, keys, num_classes, mmdet):
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for prefix, path in keys.items():
        group, name = path.split("/")
        if path == "l2norm/scale":
            np.testing.assert_array_equal(params["l2norm"]["scale"], state[prefix])
            continue
        weight, bias = state[f"{prefix}.weight"], state[f"{prefix}.bias"]
        if mmdet and group == "conf":
            weight, bias = (background_first(weight, num_classes + 1),
                            background_first(bias, num_classes + 1))
        np.testing.assert_array_equal(params[group][name]["kernel"], weight.transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(params[group][name]["bias"], bias)


CASES = {  # (layout, size, object classes, how the file is written)
    "torchvision_coco300_zip": ("torchvision", 300, 90, "zip"),
    "ssd.pytorch_voc300_legacy": ("ssd.pytorch", 300, 20, "legacy"),
    "lufficc_voc512_wrapped": ("lufficc", 512, 20, "wrapped"),
    "lufficc_coco300_npz": ("lufficc", 300, 80, "npz"),
    "mmdet_coco300_wrapped": ("mmdet", 300, 80, "wrapped"),
    "mmdet-legacy_coco512_npz": ("mmdet-legacy", 512, 80, "npz"),
}


def write(path, state, how):
    if how == "npz":
        np.savez(path, **state)
    elif how == "wrapped":  # a training checkpoint: lufficc's {"model"}, mmdet's {"state_dict"}
        write_pth(path, {"model": state, "state_dict": state, "iteration": 7,
                         "optimizer": {"state": {0: {"momentum_buffer": np.zeros(3)}}}})
    else:
        write_pth(path, state, legacy=how == "legacy")


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_every_peer_tensor_lands_where_the_map_says(case, tmp_path):
    layout, size, num_classes, how = case
    state, keys = fake_state(layout, size, num_classes)
    source = tmp_path / ("weights.npz" if how == "npz" else "weights.pth")
    write(source, state, how)
    format_name = layout.removesuffix("-legacy")
    convert_ssd.main(["--format", format_name, str(source), str(tmp_path / "out")])
    loaded = load_model(tmp_path / "out")
    assert loaded.config.priors.image_size == size and loaded.config.num_classes == num_classes
    assert loaded.meta["source"] == {"format": format_name, "file": source.name}
    assert_every_tensor_lands_where_the_map_says(loaded.model, state, keys, num_classes,
                                                 mmdet=format_name == "mmdet")


def test_parameter_totals_are_the_peers():
    # torchvision's ssd300_vgg16 and ssd.pytorch's SSD300 (the map, sections 1.1 and 2.1).
    for layout, classes, total in (("torchvision", 90, 35_641_826), ("ssd.pytorch", 20, 26_285_486)):
        state, _ = fake_state(layout, 300, classes)
        assert sum(v.size for v in state.values()) == total and len(state) == 71


def changed_priors(config):
    unclipped = prior_boxes(dataclasses.replace(config, clip="none"))
    return int(np.sum(np.any(np.abs(prior_boxes(config) - unclipped) > 1e-7, axis=1)))


PEERS = {  # format, size, classes -> (priors changed by the peer's clip, min_sizes, max size)
    ("torchvision", 300, 90): (2, (21, 45, 99, 153, 207, 261), 315),
    ("ssd.pytorch", 300, 20): (134, (30, 60, 111, 162, 213, 264), 315),
    ("lufficc", 300, 80): (116, (21, 45, 99, 153, 207, 261), 315),
    ("lufficc", 512, 20): (42, (35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8), 537.65),
    ("lufficc", 512, 80): (42, (20.48, 51.2, 133.12, 215.04, 296.96, 378.88, 460.8), 542.72),
    ("mmdet", 512, 80): (0, (20, 51, 133, 215, 296, 378, 460), 542),
    ("mmdet", 512, 20): (0, (35, 76, 153, 230, 307, 384, 460), 537),
}


@pytest.mark.parametrize("peer", PEERS, ids=[f"{f}_{s}_{c}" for f, s, c in PEERS])
def test_each_peer_gets_its_default_boxes(peer):
    format_name, size, classes = peer
    changed, min_sizes, last_max = PEERS[peer]
    model, _ = convert_detector(format_name, fake_state(format_name, size, classes)[0])
    priors = model.config.priors
    assert priors.min_sizes == min_sizes and priors.max_sizes[-1] == last_max
    assert changed_priors(priors) == changed


def test_each_peer_gets_its_pixels_classes_labels_and_settings():
    expected = {
        "torchvision": (90, (122.99925, 116.9991, 103.9992), "float", 0.01, 400, 200, True),
        "ssd.pytorch": (20, (123, 117, 104), "opencv", 0.01, 200, None, False),
        "lufficc": (80, (123, 117, 104), "opencv", 0.01, None, 100, False),
        "mmdet": (80, (123.675, 116.28, 103.53), "opencv", 0.02, 1000, 200, True),
    }
    for format_name, (classes, mean, resize, score, pre, top, clip) in expected.items():
        model, peer = convert_detector(format_name, fake_state(format_name, 300, classes)[0])
        np.testing.assert_allclose(model.config.pixel_mean, mean, atol=1e-4)
        assert model.config.pixel_std == (1.0, 1.0, 1.0)
        settings = peer.inference
        assert (settings.resize, settings.score_threshold, settings.pre_nms_top_k,
                settings.top_k, settings.clip_boxes) == (resize, score, pre, top, clip)
        assert (settings.candidates == "per_level") == settings.drop_empty_boxes == (
            format_name == "mmdet")
        if format_name == "torchvision":  # COCO category ids, the gaps named N/A
            assert peer.label_ids == tuple(range(1, 91))
            assert [i for i, n in zip(peer.label_ids, peer.class_names) if n == "N/A"] == [
                12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
            assert peer.class_names[0] == "person" and peer.class_names[89] == "toothbrush"
        elif format_name == "mmdet":  # contiguous 0..79
            assert peer.label_ids == tuple(range(80)) and peer.class_names == COCO_CLASSES
        else:
            assert peer.label_ids == tuple(range(1, classes + 1))
            assert peer.class_names == (VOC_CLASSES if classes == 20 else COCO_CLASSES)


def test_a_converted_checkpoint_gives_a_detector_with_the_peers_settings(tmp_path):
    state, _ = fake_state("torchvision", 300, 90)
    np.savez(tmp_path / "tv.npz", **state)
    convert_ssd.main(["--format", "torchvision", str(tmp_path / "tv.npz"), str(tmp_path / "out")])
    detector = Detector.from_checkpoint(tmp_path / "out")
    assert detector.settings.resize == "float" and detector.score_threshold == 0.01
    assert list(detector.label_ids) == list(range(1, 91)) and detector.class_names[11] == "N/A"
    assert Detector.from_checkpoint(tmp_path / "out", score_threshold=0.5).score_threshold == 0.5


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.convert_ssd", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_bad_formats_files_and_state_dicts_are_clear_errors(tmp_path):
    run = run_cli("--format", "caffe", "x.pth", tmp_path / "out")
    assert run.returncode == 2 and "invalid choice: 'caffe'" in run.stderr
    run = run_cli("--format", "mmdet", tmp_path / "missing.pth", tmp_path / "out")
    assert run.returncode == 1 and "missing.pth does not exist" in run.stderr
    assert "Traceback" not in run.stderr
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="notes.pth is not a PyTorch file"):
        convert_ssd.main(["--format", "lufficc", str(tmp_path / "notes.pth"), str(tmp_path / "o")])

    state, _ = fake_state("ssd.pytorch", 300, 20)
    with pytest.raises(ValueError, match="unknown format 'caffe'"):
        convert_detector("caffe", state)
    with pytest.raises(ValueError, match="no head.classification_head.module_list.0.weight"):
        convert_detector("torchvision", state)  # another peer's layout
    cases = {
        "no extras.3.bias": lambda s: s.pop("extras.3.bias"),
        r"vgg.31.weight has shape \(1024, 512, 1, 1\) but ssd.pytorch SSD300 with 20 classes "
        r"expects \(1024, 512, 3, 3\)": lambda s: s.update(
            {"vgg.31.weight": s["vgg.31.weight"][:, :, :1, :1]}),
        r"no place in ssd.pytorch SSD300: \['extras.8.weight'\]": lambda s: s.update(
            {"extras.8.weight": np.zeros(3, np.float32)}),
        "only SSD300 VOC .20 classes., got SSD300 with 19 classes": lambda s: s.update(
            {"conf.0.weight": s["conf.0.weight"][:80], "conf.0.bias": s["conf.0.bias"][:80]}),
    }
    for message, edit in cases.items():
        broken = dict(state)
        edit(broken)
        with pytest.raises(ValueError, match=message):
            convert_detector("ssd.pytorch", broken)


def test_the_output_folder_must_be_new(tmp_path):
    np.savez(tmp_path / "w.npz", **fake_state("ssd.pytorch", 300, 20)[0])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="out exists and is not empty"):
        convert_ssd.main(["--format", "ssd.pytorch", str(tmp_path / "w.npz"), str(tmp_path / "out")])
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
