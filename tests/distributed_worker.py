"""One process of test_sharding's two-process run: `python -m tests.distributed_worker WORKDIR
OUT`, with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set (`train` joins
the run through them). Trains TINY for 2 steps, then writes OUT/process_<i>.npz: the
parameters this process held when it saved the last checkpoint, its mAP, what it saw of the
run (process and device counts) and the files it opened for writing in WORKDIR outside the
checkpoints (orbax writes those, through its own file layer)."""
import builtins
import dataclasses
import io
import sys
from pathlib import Path

import jax
import numpy as np

from ssd_jax import train as train_lib
from ssd_jax.data.shapes import CLASS_NAMES
from tests.test_train import TINY, tiny_sources


def record_writes_in(folder: Path) -> list[str]:
    """The names of the files in `folder` that this process opens for writing from now on
    (by `open`, which pathlib, json and matplotlib go through), in a list that grows."""
    names, real_open = [], builtins.open

    def recording_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, Path)) and set(mode) & set("wax+"):
            path = Path(file).resolve()
            if path.parent == folder.resolve():
                names.append(path.name)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = recording_open
    return names


def main(workdir: str, out: str) -> None:
    written = record_writes_in(Path(workdir))
    saved_params = {}
    real_save = train_lib.save

    def save_and_keep_params(manager, step, state, meta):
        saved_params.update(
            (jax.tree_util.keystr(path), np.asarray(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(state.params))
        real_save(manager, step, state, meta)

    train_lib.save = save_and_keep_params
    config = dataclasses.replace(TINY, num_steps=2, workdir=workdir)
    result = train_lib.train(config, *tiny_sources(), CLASS_NAMES)
    np.savez(Path(out) / f"process_{jax.process_index()}.npz", map=result["map"],
             process_count=jax.process_count(), device_count=jax.device_count(),
             written=np.array(sorted(set(written)), dtype=str), **saved_params)


if __name__ == "__main__":
    main(*sys.argv[1:])
