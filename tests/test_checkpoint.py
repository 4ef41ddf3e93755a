"""Checkpoint records: the detector rebuilt from what is stored (full model config, label
space, inference settings), old records still loading, and clear errors."""
import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from ssd_jax.checkpoint import checkpoint_meta, load_model, save_model
from ssd_jax.inference import InferenceConfig
from ssd_jax.model import get_config
from tests.helpers import random_model, random_ssd, write_untrained_checkpoint
from tests.test_train import TINY

CLASSES = ("cat", "dog", "bird")
# Not the preset's geometry: loading must take it from the record, not from get_config.
ODD_GEOMETRY = get_config("ssd_mini", num_classes=3, image_size=64, s_min=0.15, s_max=0.8,
                          pixel_mean=(1.0, 2.0, 3.0), pixel_std=(4.0, 5.0, 6.0))
ODD_GEOMETRY = dataclasses.replace(
    ODD_GEOMETRY, priors=dataclasses.replace(ODD_GEOMETRY.priors, clip="wh"))
PEER_SETTINGS = InferenceConfig(score_threshold=0.02, pre_nms_top_k=None, top_k=None,
                                clip_boxes=False, candidates="per_level",
                                drop_empty_boxes=True, resize="opencv")


def odd_model():
    return random_ssd(ODD_GEOMETRY, seed=1)


def meta_file(directory, step=0):
    return directory / "checkpoints" / str(step) / "meta" / "metadata" if (
        directory / "checkpoints").is_dir() else directory / str(step) / "meta" / "metadata"


def test_detector_and_loading_import_no_training_stack():
    code = ("import sys, ssd_jax, ssd_jax.detector, ssd_jax.checkpoint, ssd_jax.inference;"
            "assert ssd_jax.Detector is ssd_jax.detector.Detector;"
            "heavy = sorted({'grain', 'tqdm', 'matplotlib', 'ssd_jax.train'} & set(sys.modules));"
            "assert not heavy, heavy")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr


def test_a_saved_model_comes_back_with_its_stored_geometry_labels_and_settings(tmp_path):
    model = odd_model()
    save_model(tmp_path, model, CLASSES, label_ids=[7, 3, 12], inference=PEER_SETTINGS,
               source={"format": "test"})
    loaded = load_model(tmp_path)
    assert loaded.config == ODD_GEOMETRY and loaded.config != get_config(
        "ssd_mini", num_classes=3, image_size=64)
    assert loaded.class_names == CLASSES and loaded.label_ids == (7, 3, 12)
    assert loaded.inference == PEER_SETTINGS and loaded.step == 0
    assert loaded.meta["source"] == {"format": "test"}
    expected, actual = nnx.state(model, nnx.Param), nnx.state(loaded.model, nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, actual, expected)


def test_a_training_checkpoint_records_its_whole_model_config(tmp_path):
    write_untrained_checkpoint(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.meta["format_version"] == 2 and loaded.meta["train"]["model"] == "ssd_mini"
    assert loaded.config == random_model(TINY).config
    assert loaded.inference == InferenceConfig() and loaded.label_ids == tuple(range(1, 7))


def test_an_old_checkpoint_with_only_the_training_config_still_loads(tmp_path):
    write_untrained_checkpoint(tmp_path, old_format=True)
    assert "format_version" not in json.loads(meta_file(tmp_path).read_text())
    loaded = load_model(tmp_path)
    reference = load_model(write_untrained_checkpoint(tmp_path / "new"))
    assert loaded.config == reference.config and loaded.class_names == reference.class_names
    jax.tree.map(np.testing.assert_array_equal, nnx.state(loaded.model, nnx.Param),
                 nnx.state(reference.model, nnx.Param))
    loc, conf = loaded.model(np.zeros((1, 64, 64, 3), np.uint8))
    assert conf.shape == (1, loaded.config.priors.num_priors, 7)


def edit_record(directory, edit):
    path = meta_file(directory)
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_stored_priors_that_do_not_fit_the_weights_are_a_clear_error(tmp_path):
    save_model(tmp_path, odd_model(), CLASSES)

    def more_ratios(meta):  # 6 boxes per cell on the first map instead of 4
        meta["model"]["priors"]["aspect_ratios"][0] = [2, 3]

    edit_record(tmp_path, more_ratios)
    with pytest.raises(ValueError, match="does not fit the stored weights: "
                                         r"params/conf/conv4_2/bias has shape \(16,\).*\(24,\)"):
        load_model(tmp_path)


def test_records_that_are_not_ours_are_clear_errors(tmp_path):
    save_model(tmp_path, odd_model(), CLASSES)
    cases = {
        "unknown inference settings": lambda m: m["inference"].update(nms="soft"),
        "unknown layer type": lambda m: m["model"]["backbone"][0].update(type="deconv"),
        "reads up to 2": lambda m: m.update(format_version=3),
        "KeyError: 'model'": lambda m: m.pop("model"),
        "3 class names for a model of 4": lambda m: m["model"].update(num_classes=4),
    }
    original = meta_file(tmp_path).read_text()
    for message, edit in cases.items():
        meta_file(tmp_path).write_text(original)
        edit_record(tmp_path, edit)
        with pytest.raises(ValueError, match=message):
            load_model(tmp_path)


def test_a_record_must_name_every_class_once():
    with pytest.raises(ValueError, match="2 class names for a model of 3"):
        checkpoint_meta(ODD_GEOMETRY, CLASSES[:2])
    with pytest.raises(ValueError, match="label_ids must be 3 distinct"):
        checkpoint_meta(ODD_GEOMETRY, CLASSES, label_ids=[1, 1, 2])


def test_missing_checkpoint_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nothing")


def test_a_checkpoint_loads_through_a_relative_path(tmp_path, monkeypatch):
    write_untrained_checkpoint(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert load_model("run").step == 0
