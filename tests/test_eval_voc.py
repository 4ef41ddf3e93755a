"""experiments.eval_voc end to end on an untrained tiny checkpoint: the devkit results files,
the precision/recall figure and eval.json, on the shapes data and on a tiny VOCdevkit folder."""
import contextlib
import dataclasses
import io
import json
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from experiments import eval_voc
from reference.voc_eval import evaluate_detections
from ssd_jax.data import voc
from ssd_jax.data.shapes import CLASS_NAMES
from tests.helpers import write_untrained_checkpoint
from tests.test_train import TINY
from tests.test_voc import IMAGES, devkit  # noqa: F401 (devkit: a tiny VOCdevkit fixture)

SHAPES = ["--dataset", "shapes", "--eval-examples", "8", "--batch-size", "4"]


def run_main(argv):
    """eval_voc.main's (result, stdout)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = eval_voc.main(argv)
    return result, stdout.getvalue()


def read_results(folder, class_names):
    """The devkit results files as {class name: [(image id, score, [4] pixel box)]}."""
    entries = {}
    for name in class_names:
        lines = (folder / f"comp4_det_test_{name}.txt").read_text().splitlines()
        fields = [line.split(" ") for line in lines]
        assert all(len(f) == 6 for f in fields), "<image id> <score> <xmin> <ymin> <xmax> <ymax>"
        entries[name] = [(f[0], float(f[1]), np.array(f[2:], float)) for f in fields]
    return entries


def as_detections(entries, image_ids, image_sizes, class_names):
    """Results files back to normalized per-image detections, for evaluate_detections."""
    per_image = {image_id: defaultdict(list) for image_id in image_ids}
    for label, name in enumerate(class_names, 1):
        for image_id, score, box in entries[name]:
            height, width = image_sizes[image_ids.index(image_id)]
            per_image[image_id]["boxes"].append(box / [width, height, width, height])
            per_image[image_id]["scores"].append(score)
            per_image[image_id]["labels"].append(label)
    return [{"boxes": np.reshape(d["boxes"], (-1, 4)), "scores": np.array(d["scores"]),
             "labels": np.array(d["labels"], int)} for d in per_image.values()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_untrained_checkpoint(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def shapes_eval(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    result, stdout = run_main(["--checkpoint", str(checkpoint), *SHAPES, "--out", str(out)])
    return result, stdout, out


def test_results_files_hold_the_returned_detections_in_1_based_pixels(shapes_eval):
    result, _, out = shapes_eval
    entries = read_results(out, CLASS_NAMES)
    assert sum(map(len, entries.values())) == sum(len(d["scores"]) for d in result["detections"])
    for image, (detections, truth) in enumerate(zip(result["detections"],
                                                    result["ground_truths"])):
        height, width = truth["image_size"]
        for label, name in enumerate(CLASS_NAMES, 1):
            mine = detections["labels"] == label
            written = [entry for entry in entries[name] if entry[0] == str(image)]
            assert len(written) == mine.sum()
            boxes = np.array([box for _, _, box in written]).reshape(-1, 4)
            # Scores keep their float32 value; boxes are x * width, y * height, to 0.01 px.
            np.testing.assert_array_equal(np.float32([s for _, s, _ in written]),
                                          detections["scores"][mine])
            np.testing.assert_allclose(boxes, detections["boxes"][mine]
                                       * [width, height, width, height], rtol=0, atol=0.0051)
            assert np.all(boxes >= 0) and np.all(boxes[:, [0, 2]] <= width)
            assert np.all(boxes[:, [1, 3]] <= height) and np.all(boxes[:, 2:] >= boxes[:, :2])
    assert len(entries["star"]) > 0, "an untrained model detects something in every class"


def test_results_files_score_the_returned_map(shapes_eval):
    result, _, out = shapes_eval
    ids = [str(i) for i in range(len(result["ground_truths"]))]
    sizes = [truth["image_size"] for truth in result["ground_truths"]]
    detections = as_detections(read_results(out, CLASS_NAMES), ids, sizes, CLASS_NAMES)
    rescored = evaluate_detections(detections, result["ground_truths"], len(CLASS_NAMES))
    np.testing.assert_allclose(rescored["ap"], result["ap"], rtol=0, atol=1e-12)


def test_eval_json_and_printed_table_give_the_returned_map(shapes_eval):
    result, stdout, out = shapes_eval
    report = json.loads((out / "eval.json").read_text())
    assert report["metric"] == "VOC2007 11-point" and report["dataset"] == "shapes"
    assert report["num_images"] == 8 and list(report["ap"]) == list(CLASS_NAMES)
    assert report["map"] == result["map"]
    assert [report["ap"][name] for name in CLASS_NAMES] == result["ap"].tolist()
    assert "VOC2007 11-point AP on 8 shapes images" in stdout
    assert f"mAP        {result['map']:6.4f}" in stdout.splitlines()


def test_precision_recall_curves_png_is_written(shapes_eval):
    result, _, out = shapes_eval
    assert len(result["recall"]) == len(result["precision"]) == len(CLASS_NAMES)
    with Image.open(out / "pr_curves.png") as figure:
        assert figure.format == "PNG" and figure.width > 200 and figure.height > 200


def test_area_metric_switches_the_metric_and_default_out_is_next_to_the_run(shapes_eval,
                                                                             checkpoint):
    result_07, _, out_07 = shapes_eval
    result, stdout = run_main(["--checkpoint", str(checkpoint / "checkpoints"), *SHAPES,
                               "--area-metric"])
    out = checkpoint / "eval"
    report = json.loads((out / "eval.json").read_text())
    assert report["metric"] == "VOC2010+ area" and "VOC2010+ area AP" in stdout
    expected = evaluate_detections(result_07["detections"], result_07["ground_truths"],
                                   len(CLASS_NAMES), use_07_metric=False)
    assert report["map"] == result["map"] == expected["map"]
    for name in CLASS_NAMES:
        file = f"comp4_det_test_{name}.txt"
        assert (out / file).read_text() == (out_07 / file).read_text()


def test_voc_ground_truth_written_as_results_gives_back_the_xml_pixels(
        devkit, tmp_path):  # noqa: F811
    source = voc.VOCFolder(devkit, voc.TRAIN_SPLITS)
    examples = [source[i] for i in range(len(source))]
    as_results = [{"boxes": e["boxes"], "scores": np.ones(len(e["labels"]), np.float32),
                   "labels": e["labels"]} for e in examples]
    eval_voc.write_devkit_results(as_results, examples, voc.VOC_CLASSES, tmp_path)
    entries = read_results(tmp_path, voc.VOC_CLASSES)
    annotated = {**IMAGES[("2007", "trainval")], **IMAGES[("2012", "trainval")]}
    for name in voc.VOC_CLASSES:
        xml = sorted((image_id, obj[1:5]) for image_id, (*_, objects) in annotated.items()
                     for obj in objects if obj[0] == name)
        written = sorted((image_id, tuple(box)) for image_id, _, box in entries[name])
        assert [image_id for image_id, _ in written] == [image_id for image_id, _ in xml]
        np.testing.assert_allclose(np.reshape([box for _, box in written], (-1, 4)),
                                   np.reshape([box for _, box in xml], (-1, 4)), atol=1e-3)


@pytest.fixture(scope="module")
def voc_checkpoint(tmp_path_factory):
    return write_untrained_checkpoint(tmp_path_factory.mktemp("voc_run"),
                                      dataclasses.replace(TINY, dataset="voc"), voc.VOC_CLASSES)


def test_voc_folder_evaluates_end_to_end_under_the_xml_image_ids(
        voc_checkpoint, devkit, tmp_path):  # noqa: F811
    result, stdout = run_main(["--checkpoint", str(voc_checkpoint), "--dataset", "voc",
                               "--data-dir", str(devkit), "--batch-size", "4",
                               "--out", str(tmp_path)])
    # The test split is one 45 x 45 image, 000001: a dog and a difficult bird.
    assert [truth["image_id"] for truth in result["ground_truths"]] == ["000001"]
    entries = read_results(tmp_path, voc.VOC_CLASSES)
    written = [entry for lines in entries.values() for entry in lines]
    assert len(written) == len(result["detections"][0]["scores"]) > 0
    assert {image_id for image_id, _, _ in written} == {"000001"}
    boxes = np.array([box for _, _, box in written])
    assert np.all(boxes >= 0) and np.all(boxes <= 45)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["dataset"] == "voc" and report["num_images"] == 1
    assert report["ap"]["bird"] is None and report["ap"]["dog"] == report["map"]
    assert "on 1 voc images" in stdout and (tmp_path / "pr_curves.png").stat().st_size > 0


def test_a_checkpoint_of_other_classes_is_refused_before_inference(
        checkpoint, devkit):  # noqa: F811
    with pytest.raises(SystemExit, match="trained on the classes .*'ellipse'.* --dataset voc"):
        eval_voc.main(["--checkpoint", str(checkpoint), "--dataset", "voc",
                       "--data-dir", str(devkit)])
