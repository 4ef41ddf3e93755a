"""Data parallelism beyond test_train's: evaluation split over conftest's 8 fake CPU devices
gives the detections of an unsplit one, and two processes train as one run in which process 0
alone writes the logs, plot and results."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from ssd_jax import inference
from ssd_jax.data.shapes import CLASS_NAMES
from ssd_jax.evaluation import evaluate_source
from ssd_jax.sharding import data_mesh, replicated
from tests.helpers import random_model
from tests.test_train import TINY, tiny_sources

ROOT = Path(__file__).resolve().parents[1]


def test_evaluation_split_over_the_devices_gives_the_unsplit_detections():
    assert jax.device_count() == 8, "conftest sets 8 host devices"
    model = random_model(TINY)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mesh = data_mesh()
    # 12 images in batches of 8: the second batch is half padding.
    source = tiny_sources()[0]
    source = [source[i] for i in range(12)]
    options = dict(batch_size=8, max_boxes=TINY.max_boxes, image_size=64,
                   num_classes=len(CLASS_NAMES))
    unsplit = evaluate_source(inference.make_predict_fn(graphdef, model.config), params, rest,
                              source, **options)
    split = evaluate_source(inference.make_predict_fn(graphdef, model.config, mesh=mesh),
                            *jax.device_put((params, rest), replicated(mesh)), source,
                            mesh=mesh, **options)
    assert len(split["detections"]) == len(unsplit["detections"]) == 12
    assert sum(len(d["scores"]) for d in unsplit["detections"]) > 0
    # The same detections; XLA:CPU's convolutions round a batch of 1 image per device a few
    # float32 ulps away from a batch of 8 on one device.
    for ours, theirs in zip(split["detections"], unsplit["detections"]):
        np.testing.assert_array_equal(ours["labels"], theirs["labels"])
        np.testing.assert_allclose(ours["scores"], theirs["scores"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours["boxes"], theirs["boxes"], atol=1e-6)
    np.testing.assert_allclose(split["ap"], unsplit["ap"], rtol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_one_run_and_only_process_0_writes(tmp_path):
    """Two local processes of 4 CPU devices each, joined by jax.distributed (gloo)."""
    workdir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_PROCESSES="2",
               JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    workers = [subprocess.Popen(
        [sys.executable, "-m", "tests.distributed_worker", str(workdir), str(out)], cwd=ROOT,
        env=dict(env, JAX_PROCESS_ID=str(process)), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for process in (0, 1)]
    try:
        logs = [worker.communicate(timeout=600)[0] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()  # no-op for one that finished; one left waiting on the other dies
    for worker, log in zip(workers, logs):
        assert worker.returncode == 0, log[-3000:]

    views = [dict(np.load(out / f"process_{process}.npz")) for process in (0, 1)]
    for view in views:
        assert view.pop("process_count") == 2 and view.pop("device_count") == 8
    written = [sorted(view.pop("written")) for view in views]
    assert written == [["eval.json", "loss_curve.png", "metrics.jsonl", "metrics.jsonl.tmp"], []]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert [r["step"] for r in records if "map" in r] == [2]
    assert sorted(views[0]) == sorted(views[1])  # mAP and every parameter
    for key in views[0]:
        np.testing.assert_array_equal(views[0][key], views[1][key])
