"""Checkpoints with orbax: the train state plus a JSON record of the model config
and class names, so a checkpoint alone is enough to rebuild the detector.

A step folder that cannot be read back (a file deleted or cut short) or that holds
non-finite numbers is damaged. Loading the latest checkpoint skips damaged steps for the
newest intact one and says so (`load_newest_intact`); loading a given step raises one
`DamagedCheckpointError` naming it.
"""
import contextlib
import gc
import json
import shutil
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


class DamagedCheckpointError(ValueError):
    """A checkpoint step that cannot be used; the message names the step and why."""

    def __init__(self, directory, step: int, reason: str):
        super().__init__(f"checkpoint step {step} in {directory} is damaged: {reason}")
        self.step, self.reason = step, reason


class DamagedCheckpointWarning(UserWarning):
    """A damaged newer checkpoint step was skipped for an older intact one."""


def checkpoint_manager(directory, *, max_to_keep: int = 3, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                           read_only=read_only)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                 item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore(manager: ocp.CheckpointManager, target_state, step: int | None = None):
    """Restores (state, meta) at `step` (default: latest) into the structure,
    shapes and shardings of `target_state` (concrete or abstract arrays).
    Raises DamagedCheckpointError if the step cannot be read or holds non-finite values."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    with reading(manager.directory, step):
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    check_finite(restored["state"], manager.directory, step)
    return restored["state"], restored["meta"]


def load_meta(directory, step: int | None = None) -> dict:
    """The JSON record of a checkpoint directory, with a clear error if there is none."""
    step = checkpoint_steps(directory)[0] if step is None else step
    manager = checkpoint_manager(directory, read_only=True)
    with reading(directory, step):
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def checkpoint_steps(directory) -> list[int]:
    """The saved steps of a checkpoint directory, newest first (FileNotFoundError if none)."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    steps = sorted(checkpoint_manager(directory, read_only=True).all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{directory} holds no checkpoint (expected orbax step folders)")
    return steps


@contextlib.contextmanager
def reading(directory, step: int):
    """Turns the errors of reading a torn or partly deleted step (orbax's and TensorStore's
    OSError, ValueError, KeyError, JSON errors) into one DamagedCheckpointError naming it."""
    try:
        yield
    except (OSError, ValueError, KeyError) as error:
        _discard_failed_reads()
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DamagedCheckpointError(directory, step, reason[:300]) from None


def _discard_failed_reads() -> None:
    """Collects the array reads a failed restore abandoned, quietly: each would otherwise
    print its own TensorStore traceback ("Exception ignored in <coroutine ...>")."""
    hook, sys.unraisablehook = sys.unraisablehook, lambda _: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook


def check_finite(tree, directory, step: int) -> None:
    """Raises DamagedCheckpointError if an array of `tree` holds NaN or infinity."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)  # the train state is replicated: any copy will do
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.inexact) and not np.all(np.isfinite(leaf)):
            raise DamagedCheckpointError(
                directory, step, f"{jax.tree_util.keystr(path)} holds non-finite values "
                "(saved by a diverged run)")


def load_newest_intact(directory, load_step, step: int | None = None):
    """`load_step(step)` of the given step, or (step None) of the newest step it loads
    without DamagedCheckpointError; each damaged newer step is reported by a
    DamagedCheckpointWarning. Raises the given step's error, or one naming every damaged step
    when no step is intact."""
    if step is not None:
        return load_step(step)
    errors = []
    for candidate in checkpoint_steps(directory):
        try:
            result = load_step(candidate)
        except DamagedCheckpointError as error:
            errors.append(error)
            continue
        for error in errors:
            warnings.warn(f"{error}; using step {candidate}, the newest intact one",
                          DamagedCheckpointWarning, stacklevel=2)
        return result
    raise DamagedCheckpointError(directory, errors[-1].step, "; ".join(
        f"step {error.step}: {error.reason}" for error in errors) + " (no intact step left)")


def set_aside(directory, step: int) -> Path:
    """Moves a damaged step folder out of the checkpoint directory, to
    <directory>_damaged/<step>, so a resumed run can save that step again. Returns the new path."""
    directory = Path(directory)
    target = directory.with_name(directory.name + "_damaged") / str(step)
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(directory / str(step), target)
    return target
