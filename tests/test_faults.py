"""Faults a user meets, made here by the tests themselves: bad flags, diverging runs, torn and
deleted checkpoint files, another run's workdir, torn metrics, unreadable images. Nothing may
be lost or silent: each fault is refused with a message naming it, or survived and reported."""
import dataclasses
import json
import math
import re
import shutil
import warnings

import jax
import numpy as np
import pytest

from experiments import train_voc
from ssd_jax import train as train_lib
from ssd_jax.checkpoint import (DamagedCheckpointError, DamagedCheckpointWarning, checkpoint_steps,
                                load_model)
from ssd_jax.data.shapes import CLASS_NAMES
from ssd_jax.flags import ConfigError, flag_name
from tests.helpers import write_untrained_checkpoint
from tests.test_train import TINY, tiny_sources

# (field, a value it cannot take): every kind of field, each way it can be wrong.
BAD_VALUES = [
    ("learning_rate", -1.0), ("learning_rate", 0.0), ("learning_rate", math.nan),
    ("learning_rate", math.inf), ("max_boxes", 0), ("match_iou_threshold", 2.0),
    ("match_iou_threshold", -1.0), ("warmup_steps", -10), ("log_every", 0),
    ("checkpoint_every", 0), ("keep_checkpoints", 0), ("eval_examples", -1),
    ("train_examples", -1), ("eval_every", -1), ("num_workers", -1), ("batch_size", 0),
    ("batch_size", 2.5), ("num_steps", 0), ("model", "foo"), ("optimizer", "rmsprop"),
    ("dtype", "int8"), ("neg_pos_ratio", -1), ("neg_pos_ratio", 1.5), ("momentum", 1.0),
    ("weight_decay", -1e-4), ("grad_clip_norm", math.nan), ("decay_factor", 0.0),
    ("decay_steps", (20, 10)), ("decay_steps", (0,)), ("seed", -1), ("workdir", ""),
    ("image_size", -1), ("augment", "yes"),
]


@pytest.mark.parametrize("field, value", BAD_VALUES)
def test_every_bad_config_value_is_a_value_error_naming_its_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} ") as error:
        dataclasses.replace(TINY, **{field: value})
    assert isinstance(error.value, ConfigError) and error.value.field == field


@pytest.mark.parametrize("field, value", [
    ("learning_rate", "-1"), ("max_boxes", "0"), ("log_every", "0"), ("keep_checkpoints", "0"),
    ("match_iou_threshold", "2"), ("eval_examples", "-1"), ("model", "foo"),
    ("neg_pos_ratio", "-1"), ("warmup_steps", "-10"), ("num_steps", "0")])
def test_the_command_line_reports_a_bad_value_as_a_usage_error_naming_its_flag(
        field, value, capsys):
    with pytest.raises(SystemExit) as exit:
        train_voc.parse_config(["--dataset", "shapes", flag_name(field), value])
    assert exit.value.code == 2
    assert f"error: argument {flag_name(field)}: " in capsys.readouterr().err


def test_a_batch_the_devices_cannot_split_is_a_usage_error(capsys):
    assert jax.device_count() == 8, "conftest sets 8 host devices"
    with pytest.raises(SystemExit) as exit:
        train_voc.main(["--dataset", "shapes", "--batch-size", "6"])
    assert exit.value.code == 2
    assert "argument --batch-size: " in capsys.readouterr().err


# --- Damaged checkpoints, made without training. ---

def _state_files(step_folder):
    """The array data files of a step."""
    return [p for p in (step_folder / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


def _tear(step_folder, how: str) -> None:
    """Damages a step as a kill, a full disk or a careless hand would."""
    if how == "deleted data files":
        for data in _state_files(step_folder):
            data.unlink()
    elif how == "truncated data files":
        for data in _state_files(step_folder):
            data.write_bytes(data.read_bytes()[:100])
    elif how == "torn record":
        record = step_folder / "meta" / "metadata"
        record.write_text(record.read_text()[:10])


DAMAGE = ("deleted data files", "truncated data files", "torn record")


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A run folder with checkpoints at steps 0 and 2 (untrained 64 px ssd_mini)."""
    return write_untrained_checkpoint(tmp_path_factory.mktemp("run"), steps=(0, 2))


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_step_and_says_so(
        two_steps, tmp_path, capfd, how):
    run = _copy(two_steps, tmp_path)
    _tear(run / "checkpoints" / "2", how)
    with pytest.warns(DamagedCheckpointWarning, match="step 2 .* damaged.*using step 0"):
        loaded = load_model(run)
    assert loaded.step == 0
    noise = capfd.readouterr().err
    assert "Traceback" not in noise and "Exception ignored" not in noise
    with pytest.raises(DamagedCheckpointError, match="checkpoint step 2 in .* is damaged"):
        load_model(run, step=2)  # a step asked for is not replaced by another


def test_no_intact_step_is_one_error_naming_every_step(two_steps, tmp_path):
    run = _copy(two_steps, tmp_path)
    _tear(run / "checkpoints" / "2", "deleted data files")
    _tear(run / "checkpoints" / "0", "torn record")
    with pytest.raises(DamagedCheckpointError, match="step 2: .*; step 0: .*no intact step left"):
        load_model(run)


def test_a_checkpoint_holding_nan_is_never_loaded(tmp_path):
    run = write_untrained_checkpoint(tmp_path / "run", steps=(0,))
    nan_config = dataclasses.replace(TINY, workdir=str(run))
    model = train_lib.build_model(nan_config, len(CLASS_NAMES))
    tx = train_lib.make_optimizer(nan_config)
    _, state = train_lib.create_train_state(model, tx)
    state = state.replace(step=np.int32(2), params=jax.tree.map(
        lambda p: np.full(p.shape, np.nan, p.dtype), state.params))
    from ssd_jax.checkpoint import checkpoint_manager, checkpoint_meta, save
    manager = checkpoint_manager(run / "checkpoints")
    save(manager, 2, state, checkpoint_meta(model.config, CLASS_NAMES,
                                            train=dataclasses.asdict(nan_config)))
    manager.wait_until_finished()
    manager.close()
    with pytest.warns(DamagedCheckpointWarning, match="step 2 .*non-finite"):
        assert load_model(run).step == 0


# --- Training runs: one short run, resumed in copies under each fault. ---

class FlakySource:
    """tiny_sources()'s training source whose examples 5, 13, 21, ... cannot be read (truncated
    files)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        if index % 8 == 5:
            raise OSError(f"cannot read image file {index}.jpg: image file is truncated")
        return self.source[index]


def _sources():
    train_source, eval_source = tiny_sources()
    return FlakySource(train_source), eval_source


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run):
    return {r["step"]: r["loss"] for r in _records(run) if "loss" in r}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train_lib.train(dataclasses.replace(TINY, num_steps=4, workdir=str(run)), *_sources(),
                    CLASS_NAMES)
    return run


def test_unreadable_images_are_skipped_and_counted_in_the_log(trained):
    records = [r for r in _records(trained) if "loss" in r]
    assert len(records) == 4 and records[-1]["unreadable_images"] >= 1
    assert all(np.isfinite(r["loss"]) for r in records)


def test_a_diverging_run_stops_and_saves_nothing_non_finite(trained, tmp_path):
    run = _copy(trained, tmp_path)
    diverging = dataclasses.replace(TINY, workdir=str(run), num_steps=12, learning_rate=1e12,
                                    keep_checkpoints=2)
    with pytest.raises(FloatingPointError, match="non-finite loss, gradient or parameters at "
                                                 "step [0-9]+.*last good state"):
        train_lib.train(diverging, *_sources(), CLASS_NAMES)
    steps = checkpoint_steps(run / "checkpoints")
    for step in steps:  # every checkpoint loads: finite, or load_model would refuse it
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert load_model(run, step=step).step == step
    assert all(np.isfinite(loss) for loss in _losses(run).values())


def test_a_torn_checkpoint_and_a_torn_metrics_line_resume_from_the_last_intact_step(
        trained, tmp_path):
    run = _copy(trained, tmp_path)
    _tear(run / "checkpoints" / "4", "deleted data files")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # killed mid-line
    config = dataclasses.replace(TINY, workdir=str(run), num_steps=6)
    with pytest.warns(DamagedCheckpointWarning, match="step 4 .*using step 2"):
        train_lib.train(config, *_sources(), CLASS_NAMES)
    assert (run / "checkpoints_damaged" / "4").is_dir()  # set aside, not deleted
    assert checkpoint_steps(run / "checkpoints")[0] == 6
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]  # steps 3, 4 redone, each logged once
    np.testing.assert_allclose([losses[s] for s in (1, 2, 3, 4)],
                               [_losses(trained)[s] for s in (1, 2, 3, 4)], rtol=1e-6)


def test_a_workdir_holding_another_run_names_what_differs(trained, tmp_path):
    other = dataclasses.replace(TINY, workdir=str(trained), num_steps=6, optimizer="adam",
                                batch_size=16, learning_rate=0.5)
    with pytest.raises(train_lib.RunMismatchError) as error:
        train_lib.train(other, *_sources(), CLASS_NAMES)
    message = str(error.value)
    assert "--optimizer sgd there, adam here" in message
    assert "--batch-size 8 there, 16 here" in message
    assert "learning" not in message  # a changed schedule resumes
    assert "use another --workdir" in message
    with pytest.raises(train_lib.RunMismatchError, match="classes"):
        train_lib.train(dataclasses.replace(other, optimizer="sgd", batch_size=8), *_sources(),
                        CLASS_NAMES[:-1] + ("hexagon",))


def test_num_steps_below_the_checkpoint_is_a_usage_error(trained, capsys):
    with pytest.raises(SystemExit) as exit:
        train_voc.main(["--dataset", "shapes", "--workdir", str(trained), "--model", "ssd_mini",
                        "--image-size", "64", "--batch-size", "8", "--max-boxes", "4",
                        "--num-steps", "2", "--learning-rate", "1e-2", "--warmup-steps", "2",
                        "--decay-steps", "4", "--log-every", "1", "--checkpoint-every", "2",
                        "--eval-examples", "8", "--optimizer", "sgd", "--augment",
                        "--eval-every", "0", "--train-examples", "0"])
    assert exit.value.code == 2
    assert "argument --num-steps: 2 is below step 4" in capsys.readouterr().err
    assert checkpoint_steps(trained / "checkpoints")[0] == 4


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["--eval-examples", "-1"], "argument --eval-examples: must be an integer >= 0"),
    (["--out", "{file}"], "argument --out: .* is a file, not a folder")])
def test_eval_voc_argument_errors_are_usage_errors(args, message, tmp_path, capsys):
    from experiments import eval_voc
    (tmp_path / "file").write_text("")
    args = [arg.format(file=tmp_path / "file") for arg in args]
    with pytest.raises(SystemExit) as exit:
        eval_voc.main(["--checkpoint", str(tmp_path), "--dataset", "shapes", *args])
    assert exit.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_eval_voc_on_a_checkpoint_of_another_program_is_one_clear_line(tmp_path):
    from experiments import eval_voc
    from ssd_jax.checkpoint import checkpoint_manager, save
    manager = checkpoint_manager(tmp_path / "checkpoints")
    save(manager, 0, {"weights": np.zeros(3, np.float32)}, {"something": "else"})
    manager.wait_until_finished()
    manager.close()
    with pytest.raises(SystemExit, match="error: .* is not a checkpoint this version of ssd_jax "
                                         "can load"):
        eval_voc.main(["--checkpoint", str(tmp_path), "--dataset", "shapes"])
