"""COCO-format data and COCO metrics: the reader on hand-written exports (ids, crowd, empty
images, border boxes, bad entries), TFDS's coco/2017 through a fake data source, pycocotools'
figures, and a short run on a written COCO-format folder."""
import copy
import dataclasses
import io
import json
from pathlib import Path
from unittest import mock

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from experiments import eval_voc, train_voc
from ssd_jax import coco_eval, inference
from ssd_jax import train as train_lib
from ssd_jax.checkpoint import load_model
from ssd_jax.data import coco, pipeline, shapes_coco
from ssd_jax.data.sources import DatasetUnavailableError, get_sources
from ssd_jax.evaluation import evaluate_source
from tests.test_train import TINY

# An export as labelling tools write them: category ids neither 1..C nor in order, images of two
# sizes in JPEG and PNG, one without annotations, a crowd region, float boxes crossing the
# border, a degenerate box, ids of the dataset's own.
EXPORT = {
    "categories": [{"id": 30, "name": "boat"}, {"id": 5, "name": "apple"},
                   {"id": 12, "name": "cat "}],
    "images": [{"id": 71, "file_name": "a.jpg", "width": 40, "height": 20},
               {"id": 9, "file_name": "sub/b.png", "width": 30, "height": 50},
               {"id": 100, "file_name": "empty.jpg", "width": 16, "height": 16}],
    "annotations": [
        {"id": 1, "image_id": 71, "category_id": 30, "bbox": [-3.5, 2.0, 10.0, 8.0]},
        {"id": 2, "image_id": 71, "category_id": 5, "bbox": [20.25, 10.0, 30.0, 15.0],
         "iscrowd": 0, "area": 150.0},
        {"id": 3, "image_id": 9, "category_id": 12, "bbox": [0, 0, 30, 50], "iscrowd": 1},
        {"id": 4, "image_id": 9, "category_id": 5, "bbox": [5.5, 5.0, 10.0, 20.0]},
        {"id": 5, "image_id": 9, "category_id": 30, "bbox": [31.0, 4.0, 5.0, 5.0]},
    ],
}


def write_export(root: Path, split: str = "train", data=EXPORT) -> Path:
    images = root / split
    for entry in data["images"]:
        path = images / entry["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(entry["id"])
        pixels = rng.integers(0, 255, (entry["height"], entry["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


@pytest.fixture
def export(tmp_path):
    return write_export(tmp_path)


def test_category_ids_map_to_contiguous_labels_in_id_order_with_the_json_names(export):
    source = coco.COCOFolder(export, "train")
    assert source.label_ids == (5, 12, 30) and source.class_names == ("apple", "cat", "boat")
    first = source[0]
    assert first["image_id"] == 71 and first["image_size"] == (20, 40)
    np.testing.assert_array_equal(first["labels"], [3, 1])  # boat (30), apple (5)


def test_boxes_are_clipped_to_the_image_and_degenerate_ones_dropped_and_counted(export):
    source = coco.COCOFolder(export, "train")
    np.testing.assert_allclose(source[0]["boxes"], [[0, 2 / 20, 6.5 / 40, 10 / 20],
                                                    [20.25 / 40, 10 / 20, 1, 1]], rtol=1e-6)
    assert source.coco.dropped_boxes == 1  # annotation 5 lies right of its 30 px wide image
    assert "1 degenerate boxes dropped" in source.describe()


def test_crowd_regions_are_no_targets_but_stay_in_the_ground_truth_and_empty_images_count(
        export):
    source = coco.COCOFolder(export, "train")
    png = source[1]
    assert png["image"].shape == (50, 30, 3)
    np.testing.assert_array_equal(png["labels"], [1])  # the crowd region (cat) is left out
    empty = source[2]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    truth = source.coco_ground_truth()
    crowd = [a for a in truth["annotations"] if a["iscrowd"]]
    assert [(a["image_id"], a["category_id"]) for a in crowd] == [(9, 12)]
    assert len({a["id"] for a in truth["annotations"]}) == len(truth["annotations"]) == 4
    assert [c["id"] for c in truth["categories"]] == [5, 12, 30]


def test_detections_go_back_to_the_datasets_image_and_category_ids(export):
    source = coco.COCOFolder(export, "train")
    detections = [{"boxes": np.array([[0.0, 0.5, 0.5, 1.0]]), "scores": np.array([0.9]),
                   "labels": np.array([3])}]
    ground_truths = [{"image_size": (20, 40), "image_id": 71}]
    [result] = coco_eval.to_results(detections, ground_truths, source.label_ids)
    assert result == {"image_id": 71, "category_id": 30, "bbox": [0.0, 10.0, 20.0, 10.0],
                      "score": 0.9}


def _with(change):
    data = copy.deepcopy(EXPORT)
    change(data)
    return data


@pytest.mark.parametrize("change, message", [
    (lambda d: d["annotations"][1].update(bbox=[1, 2, "x", 4]),
     r"annotations\[1\] \(id 2\): 'bbox' is \[1, 2, 'x', 4\], not four finite numbers"),
    (lambda d: d["annotations"][0].update(image_id=5),
     r"annotations\[0\] \(id 1\): image_id 5 is not in 'images'"),
    (lambda d: d["annotations"][3].update(category_id=99),
     r"annotations\[3\] \(id 4\): category_id 99 is not in 'categories' \[5, 12, 30\]"),
    (lambda d: d["categories"].append({"id": 5, "name": "pear"}),
     r"categories\[3\] \(id 5\): duplicate category id 5"),
    (lambda d: d["images"][1].update(width=0), r"images\[1\] \(id 9\): 'width' is 0"),
    (lambda d: d["images"][0].pop("file_name"), r"images\[0\] \(id 71\): 'file_name' is None"),
    (lambda d: d.pop("annotations"), r"'annotations' is missing or not a list"),
])
def test_bad_entries_are_named_with_the_file(tmp_path, change, message):
    path = tmp_path / "instances_train.json"
    path.write_text(json.dumps(_with(change)))
    with pytest.raises(ValueError, match=message) as error:
        coco.COCOAnnotations(path)
    assert str(path) in str(error.value)


def test_an_image_file_that_disagrees_with_the_json_is_named_before_training(export):
    Image.new("RGB", (41, 20)).save(export / "train" / "a.jpg")
    (export / "train" / "sub" / "b.png").unlink()
    with pytest.raises(ValueError, match=r"2 of the 3 images .*\n  images\[0\] \(id 71\): the "
                                         r"json says 40 x 20 but .*a.jpg is 41 x 20\n  images\[1\] "
                                         r"\(id 9\): .*b.png: missing"):
        coco.COCOFolder(export, "train")


def test_missing_or_broken_coco_data_stops_before_training_with_what_to_do(tmp_path, export):
    with pytest.raises(DatasetUnavailableError, match="(?s)no COCO annotations for split "
                                                      "'train2017'.*shapes_coco"):
        get_sources("coco", image_size=64, data_dir=str(export))
    (export / "annotations" / "instances_val.json").write_text("{not json")
    with pytest.raises(DatasetUnavailableError, match="instances_val.json: not valid JSON"):
        get_sources("coco", image_size=64, data_dir=str(export), train_split="train",
                    eval_split="val")
    with pytest.raises(SystemExit, match="error: COCO data dir .*nowhere does not exist"):
        train_voc.main(["--dataset", "coco", "--data-dir", str(tmp_path / "nowhere"),
                        "--model", "ssd_mini", "--batch-size", "8"])


def test_an_unreadable_image_found_in_training_is_skipped(export):
    source = coco.COCOFolder(export, "train")
    (export / "train" / "a.jpg").write_bytes(b"")  # damaged after the run started
    loader = pipeline.make_train_loader(source, batch_size=3, max_boxes=4, seed=0, image_size=32)
    assert next(loader)["unreadable"].sum() == 1
    loader.close()


def _perfect(source):
    detections, ground_truths = [], []
    for index in range(len(source)):
        example = source[index]
        count = len(example["labels"])
        detections.append({"boxes": example["boxes"], "labels": example["labels"],
                           "scores": np.linspace(1, 0.5, count)})
        ground_truths.append({"image_size": example["image_size"],
                              "image_id": example["image_id"]})
    return detections, ground_truths


def test_perfect_detections_score_ap_1_and_detections_on_crowd_regions_are_ignored(export):
    source = coco.COCOFolder(export, "train")
    detections, ground_truths = _perfect(source)
    detections[1] = {key: np.concatenate([value, extra]) for (key, value), extra in zip(
        detections[1].items(), ([[0.0, 0.0, 1.0, 1.0]], [2], [0.99]))}  # the crowd region
    result = coco_eval.evaluate_detections(detections, ground_truths, source, source.class_names)
    assert result["coco"]["AP"] == result["coco"]["AP50"] == result["coco"]["AR100"] == 1.0
    np.testing.assert_allclose(result["ap"], [1.0, np.nan, 1.0], rtol=1e-12)  # no non-crowd cat


def test_tfds_coco_2017_reads_through_tfds_data_source():
    def example(image_id, width, height, objects):
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (90, 20, 200)).save(buffer, "JPEG")
        bbox, label, crowd = (list(column) for column in zip(*objects))
        return {"image": buffer.getvalue(), "image/id": image_id,
                "image/filename": f"{image_id:012d}.jpg",
                "objects": {"bbox": np.array(bbox, np.float32), "label": np.array(label),
                            "is_crowd": np.array(crowd), "area": np.full(len(label), 12.0),
                            "id": np.arange(len(label))}}

    records = [example(139, 40, 20, [((0.1, 0.2, 0.5, 0.6), 0, False),
                                     ((0.0, 0.0, 1.0, 1.0), 2, True)]),
               example(285, 10, 30, [((0.5, 0.5, 1.0, 0.75), 79, False)])]
    with mock.patch.object(coco.tfds, "data_source", return_value=records) as data_source:
        source = coco.COCOTfds("val2017", data_dir="/tfds", max_examples=0)
    assert data_source.call_args.kwargs["split"] == "validation"
    assert data_source.call_args.args == ("coco/2017",)
    first = source[0]
    np.testing.assert_allclose(first["boxes"], [[0.2, 0.1, 0.6, 0.5]])
    assert first["labels"].tolist() == [1] and first["image_id"] == 139
    assert source[1]["labels"].tolist() == [80] and source.label_ids[79] == 90
    truth = source.coco_ground_truth()
    assert truth["images"][0] == {"id": 139, "width": 40, "height": 20,
                                  "file_name": "000000000139.jpg"}
    [person, crowd, toothbrush] = truth["annotations"]
    np.testing.assert_allclose(person["bbox"], [8, 2, 16, 8])
    assert (crowd["iscrowd"], crowd["category_id"], toothbrush["category_id"]) == (1, 3, 90)


# --- A short run on a written COCO-format folder, evaluated by eval_voc. ---

# Few steps show learning on few images: the run is scored on (part of) its training split.
RUN = dataclasses.replace(TINY, dataset="coco", max_boxes=6, batch_size=8, num_steps=60,
                          optimizer="adam", learning_rate=3e-3, warmup_steps=5,
                          decay_steps=(50,), log_every=20, checkpoint_every=60, eval_every=30,
                          eval_examples=8, eval_split="train2017")


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    return shapes_coco.write_shapes_coco(tmp_path_factory.mktemp("shapes_coco"),
                                         train_images=16, val_images=4, image_size=64)


def _sources(folder):
    return get_sources("coco", image_size=64, data_dir=str(folder), eval_split=RUN.eval_split,
                       eval_examples=RUN.eval_examples)


@pytest.fixture(scope="module")
def trained(shapes_folder, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("coco_run")
    # One device: the sharding has tests of its own, and compiles slower over 8.
    result = train_lib.train(dataclasses.replace(RUN, workdir=str(workdir)),
                             *_sources(shapes_folder), devices=jax.devices()[:1])
    return workdir, result


def test_the_written_folder_holds_what_exports_hold(shapes_folder):
    source = coco.COCOFolder(shapes_folder, "train2017")
    assert source.label_ids == tuple(sorted(shapes_coco.CATEGORY_IDS))
    files = [image["file_name"] for image in source.images]
    assert any(f.endswith(".png") for f in files) and any(f.endswith(".jpg") for f in files)
    assert len({(image["width"], image["height"]) for image in source.images}) == 2
    description = source.describe()
    assert "(1 without annotations)" in description and "1 degenerate boxes dropped" in description
    assert " 0 crowd" not in description


def test_a_short_run_on_a_coco_folder_learns_and_reports_the_datasets_ids(trained,
                                                                          shapes_folder):
    workdir, result = trained
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "AP50" in r] == [30, 60]  # COCO's metric, periodic
    untrained = _untrained_ap50(shapes_folder)
    assert result["coco"]["AP50"] > 5 * untrained, (result["coco"], untrained)
    summary = json.loads((workdir / "eval.json").read_text())
    assert summary["AP50"] == result["coco"]["AP50"]
    assert load_model(workdir).label_ids == tuple(sorted(shapes_coco.CATEGORY_IDS))


def _untrained_ap50(folder):
    """Chance: the same model, untrained, scored the same way."""
    model = train_lib.build_model(RUN, 6)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    _, source, class_names = _sources(folder)
    result = evaluate_source(inference.make_predict_fn(graphdef, model.config), params, rest,
                             source, batch_size=8, max_boxes=1, image_size=64, num_classes=6,
                             metric="coco", class_names=class_names)
    return result["coco"]["AP50"]


def test_eval_voc_writes_coco_results_that_pycocotools_scores_to_its_figures(
        trained, shapes_folder, tmp_path, capsys):
    workdir, _ = trained
    eval_voc.main(["--checkpoint", str(workdir), "--dataset", "coco", "--data-dir",
                   str(shapes_folder), "--eval-split", "train2017", "--eval-examples", "8",
                   "--metric", "coco", "--out", str(tmp_path)])
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in capsys.readouterr().out
    report = json.loads((tmp_path / "eval.json").read_text())
    results = json.loads((tmp_path / "detections.json").read_text())
    _, source, _ = _sources(shapes_folder)
    assert {r["category_id"] for r in results} <= set(shapes_coco.CATEGORY_IDS)
    assert {r["image_id"] for r in results} <= {image["id"] for image in source.images}
    # Scored again from the files, by pycocotools alone.
    truth_path = tmp_path / "truth.json"
    truth_path.write_text(json.dumps(source.coco_ground_truth()))
    truth = COCO(str(truth_path))
    evaluator = COCOeval(truth, truth.loadRes(str(tmp_path / "detections.json")), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    for name, value in zip(coco_eval.STAT_NAMES, evaluator.stats):
        assert report[name] == (value if value >= 0 else None), name
    assert report["AP"] > 0
    # VOC's metric stays available for a COCO-format dataset.
    eval_voc.main(["--checkpoint", str(workdir), "--dataset", "coco", "--data-dir",
                   str(shapes_folder), "--eval-examples", "4", "--metric", "voc07",
                   "--out", str(tmp_path / "voc")])
    assert json.loads((tmp_path / "voc" / "eval.json").read_text())["metric"] == \
        "VOC2007 11-point"


def test_the_coco_presets_are_the_caffe_releases_recipe_with_cocos_default_boxes():
    config = train_voc.parse_config(["--dataset", "coco"])
    assert (config.model, config.batch_size, config.learning_rate) == ("ssd300_coco", 32, 1e-3)
    assert (config.num_steps, config.decay_steps) == (400_000, (280_000, 360_000))
    ssd300 = train_lib.model_config(config, 80).priors
    ssd512 = train_lib.model_config(dataclasses.replace(config, model="ssd512_coco"), 80).priors
    # Scales s_k as fractions of the image: conv4_3's, then the paper's line from 0.15 (0.1).
    np.testing.assert_allclose(np.array(ssd300.min_sizes) / 300, [0.07, 0.15, 0.33, 0.51, 0.69,
                                                                  0.87])
    np.testing.assert_allclose(np.array(ssd512.min_sizes) / 512, [0.04, 0.1, 0.26, 0.42, 0.58,
                                                                  0.74, 0.9])
    assert (ssd300.num_priors, ssd512.num_priors) == (8732, 24564)


def test_sources_without_a_coco_json_are_scored_from_their_ground_truth_difficult_as_crowd():
    ground_truths = [{"boxes": np.array([[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]]),
                      "labels": np.array([1, 2]), "difficult": np.array([False, True]),
                      "image_size": (100, 200)}]
    detections = [{"boxes": np.array([[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]]),
                   "labels": np.array([1, 2]), "scores": np.array([0.9, 0.8])}]
    source = object()  # no coco_ground_truth, no label_ids: labels 1..C are the ids
    result = coco_eval.evaluate_detections(detections, ground_truths, source, ("a", "b"))
    assert result["coco"]["AP"] == pytest.approx(1.0, abs=1e-12) and np.isnan(result["ap"][1])
    assert result["results"][0] == {"image_id": 0, "category_id": 1,
                                    "bbox": [20.0, 10.0, 80.0, 40.0], "score": 0.9}
