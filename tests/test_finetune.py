"""Fine-tuning (`--init-from`, `--freeze-backbone`): shared classes' logits carried over by name
(synonyms too), the rest fresh, other default boxes refused, a frozen backbone untouched."""
import dataclasses

import jax
import numpy as np
import pytest
import optax
from flax import nnx

from experiments import train_voc
from ssd_jax import train as train_lib
from ssd_jax.checkpoint import load_meta, load_model, save_model
from ssd_jax.data.shapes import CLASS_NAMES
from ssd_jax.finetune import InitFromError, init_from_checkpoint, shared_classes
from ssd_jax.model import get_config
from tests.helpers import random_ssd, write_untrained_checkpoint
from tests.test_train import TINY

# A "COCO" checkpoint; the run fine-tunes to "VOC" names: aeroplane from airplane, dog by its
# own name (another case), cat is new.
COCO_NAMES = ("person", "airplane", "Dog")
VOC_NAMES = ("aeroplane", "cat", "dog")


def tiny_config(**overrides):
    return get_config("ssd_mini", num_classes=3, image_size=64, **overrides)


def outputs(model, seed=0):
    """(loc, conf logits) of `model` for a random 64 px image; jitted, as one compiled
    function is faster than each layer compiled on its own."""
    images = np.random.default_rng(seed).integers(0, 256, (1, 64, 64, 3), np.uint8)
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state: nnx.merge(graphdef, state)(images))(state)


def test_shared_classes_are_matched_by_name_case_and_synonyms_aside():
    source = ("Person", "airplane", "N/A", "N/A", "tv", "dining table")
    target = ("aeroplane", "person", "tvmonitor", "bird", "N/A", "DiningTable")
    # N/A names two checkpoint classes: ambiguous, so not carried; bird is not there.
    assert shared_classes(source, target) == {0: 0, 1: 2, 2: 1, 3: 5, 6: 6}


def test_shared_classes_logits_are_copied_and_the_rest_start_fresh(tmp_path):
    trained = random_ssd(tiny_config(), seed=1)
    save_model(tmp_path, trained, COCO_NAMES)
    model = random_ssd(tiny_config(), seed=2)  # stands for the run's freshly initialized model
    fresh = {source: np.asarray(head.kernel[...]) for source, head in model.conf.items()}

    carried = init_from_checkpoint(model, VOC_NAMES, tmp_path)

    assert carried == {"aeroplane": "airplane", "dog": "Dog"}
    trained_loc, trained_conf = outputs(trained)
    loc, conf = outputs(model)
    np.testing.assert_array_equal(loc, trained_loc)  # backbone, extras and box heads loaded
    # background, aeroplane <- airplane (index 2 there), dog <- Dog (3)
    np.testing.assert_allclose(conf[..., [0, 1, 3]], trained_conf[..., [0, 2, 3]], rtol=1e-6)
    assert not np.allclose(conf[..., 2], trained_conf[..., 1], atol=1e-3)  # cat is not person
    for source, head in model.conf.items():  # cat keeps the fresh weights of every anchor
        per_anchor = (*fresh[source].shape[:-1], -1, len(VOC_NAMES) + 1)  # anchor-major
        np.testing.assert_array_equal(np.asarray(head.kernel[...]).reshape(per_anchor)[..., 2],
                                      fresh[source].reshape(per_anchor)[..., 2])


def test_other_default_boxes_are_a_clear_error(tmp_path):
    save_model(tmp_path, random_ssd(tiny_config()), COCO_NAMES)
    with pytest.raises(InitFromError, match=r"image_size 64 there, 96 here; feature_map_sizes "
                       r"\(8, 4, 2, 1, 1\) there, \(12, 6, 3, 2, 1\) here"):
        init_from_checkpoint(random_ssd(get_config("ssd_mini", num_classes=3, image_size=96)),
                             VOC_NAMES, tmp_path)
    wider = random_ssd(tiny_config(widths=(16, 32, 64, 128)))
    with pytest.raises(InitFromError, match=r"conv4_1/bias has shape \(96,\) in .* but \(128,\)"):
        init_from_checkpoint(wider, VOC_NAMES, tmp_path)


def test_the_run_normalizes_its_inputs_as_the_checkpoints_backbone_learned(tmp_path):
    stats = dict(pixel_mean=(123.0, 117.0, 104.0), pixel_std=(1.0, 1.0, 1.0))  # torchvision's
    save_model(tmp_path, random_ssd(tiny_config(**stats)), COCO_NAMES)
    config = dataclasses.replace(TINY, init_from=str(tmp_path))
    run_config = train_lib.model_config(config, len(VOC_NAMES))
    assert (run_config.pixel_mean, run_config.pixel_std) == (stats["pixel_mean"],
                                                             stats["pixel_std"])


def test_a_frozen_backbone_gets_no_update_not_even_weight_decay():
    config = dataclasses.replace(TINY, init_from="checkpoint", freeze_backbone=True)
    assert config.weight_decay > 0 and config.momentum > 0
    params = nnx.state(random_ssd(tiny_config()), nnx.Param)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    tx = train_lib.make_optimizer(config)

    @jax.jit
    def two_steps(params):
        state, updated = tx.init(params), params
        for _ in range(2):
            updates, state = tx.update(grads, state, updated)
            updated = optax.apply_updates(updated, updates)
        return updated

    updated = two_steps(params)
    jax.tree.map(np.testing.assert_array_equal, updated["backbone"], params["backbone"])
    for part in ("extras", "loc", "conf"):
        assert not any(jax.tree.leaves(jax.tree.map(np.array_equal, updated[part], params[part])))


def test_freeze_backbone_and_init_from_are_checked_with_the_config():
    with pytest.raises(ValueError, match="freeze_backbone needs a trained backbone"):
        dataclasses.replace(TINY, freeze_backbone=True)
    with pytest.raises(ValueError, match="init_from and --backbone-weights"):
        dataclasses.replace(TINY, init_from="a", backbone_weights="b")


TINY_FLAGS = ["--dataset", "shapes", "--image-size", "64", "--batch-size", "8", "--max-boxes",
              "4", "--num-steps", "2", "--log-every", "1", "--eval-examples", "8",
              "--train-examples", "64", "--warmup-steps", "0"]


def test_train_voc_starts_from_a_checkpoint_and_a_rerun_resumes(tmp_path, capsys, monkeypatch):
    """From our own training run's folder (6 shape classes here, 3 there, 2 shared)."""
    source = write_untrained_checkpoint(tmp_path / "coco", class_names=("Star", "car", "Cross"))
    trained = load_model(source).model
    run = [*TINY_FLAGS, "--init-from", str(source), "--freeze-backbone",
           "--workdir", str(tmp_path / "run")]
    train_voc.main(run)
    log = capsys.readouterr()
    assert ("classes carried over: star (from Star), cross (from Cross); start fresh: ellipse, "
            "rectangle, triangle, diamond") in log.out + log.err
    tuned = load_model(tmp_path / "run").model
    assert tuned.config.num_classes == len(CLASS_NAMES)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(tuned.backbone, nnx.Param),
                 nnx.state(trained.backbone, nnx.Param))  # frozen through 2 real steps
    assert not np.array_equal(tuned.loc["conv4_2"].kernel[...],
                              trained.loc["conv4_2"].kernel[...])

    # A rerun of the command: the workdir's checkpoint wins over --init-from, the run resumes
    # (the costly rest of it is skipped: what the run is started from is all that matters).
    class Started(Exception):
        pass

    def start(config, num_classes, mesh, *, init_from_classes=None):
        raise Started(init_from_classes)

    monkeypatch.setattr(train_lib, "init_training", start)
    with pytest.raises(Started) as started:
        train_voc.main(run)
    assert started.value.args == (None,)
    meta = load_meta(tmp_path / "run" / "checkpoints")
    train_lib.check_same_run(meta, train_voc.parse_config(run), CLASS_NAMES, tmp_path / "run")
    other = train_voc.parse_config([*run[:-5], "--init-from", "other", *run[-3:]])
    with pytest.raises(train_lib.RunMismatchError, match=f"--init-from {source} there, other"):
        train_lib.check_same_run(meta, other, CLASS_NAMES, tmp_path / "run")


def test_train_voc_reports_other_default_boxes_as_a_usage_error(tmp_path, capsys):
    save_model(tmp_path / "coco", random_ssd(tiny_config()), COCO_NAMES)
    with pytest.raises(SystemExit):
        train_voc.main([*TINY_FLAGS[:2], "--image-size", "96", *TINY_FLAGS[4:], "--init-from",
                        str(tmp_path / "coco"), "--workdir", str(tmp_path / "run")])
    assert "argument --init-from:" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(SystemExit):
        train_voc.main([*TINY_FLAGS, "--init-from", str(tmp_path / "nothing")])
    assert "argument --init-from: checkpoint directory" in capsys.readouterr().err
