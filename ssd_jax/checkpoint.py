"""Checkpoints with orbax: the train state plus a JSON record of the model config
and class names, so a checkpoint alone is enough to rebuild the detector."""
from pathlib import Path

import jax
import orbax.checkpoint as ocp


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
    shapes and shardings of `target_state` (concrete or abstract arrays)."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]


def load_meta(directory, step: int | None = None) -> dict:
    """The JSON record of a checkpoint directory, with a clear error if there is none."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    manager = checkpoint_manager(directory, read_only=True)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory} holds no checkpoint (expected orbax step folders)")
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
