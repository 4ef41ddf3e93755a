import contextlib
import dataclasses
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from reference.augment import resize
from ssd_jax import Detector
from ssd_jax.checkpoint import (DamagedCheckpointWarning, checkpoint_manager, load_model, save,
                                save_model)
from ssd_jax.cli import main
from ssd_jax.data.shapes import CLASS_NAMES, ShapesDataset
from tests.helpers import write_untrained_checkpoint

# Untrained, so scores sit near 1 / (C + 1): a low threshold still gives many detections.
SCORE_THRESHOLD = 0.05
SIZES = [(64, 64), (40, 50), (100, 30), (33, 77), (120, 90)]  # (height, width)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A run folder holding a checkpoint as `train` writes it, of an untrained 64 px ssd_mini."""
    return write_untrained_checkpoint(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def detector(checkpoint):
    return Detector.from_checkpoint(checkpoint, score_threshold=SCORE_THRESHOLD, top_k=20,
                                    batch_size=4)


def shapes_images(sizes=SIZES):
    """Shapes images resized to each (height, width)."""
    examples = ShapesDataset("validation", num_examples=len(sizes), image_size=64)
    return [np.asarray(Image.fromarray(examples[i]["image"]).resize((w, h)))
            for i, (h, w) in enumerate(sizes)]


def assert_same_detections(actual, expected):
    assert actual["class_names"] == expected["class_names"]
    np.testing.assert_array_equal(actual["labels"], expected["labels"])
    np.testing.assert_allclose(actual["scores"], expected["scores"], rtol=1e-5)
    np.testing.assert_allclose(actual["boxes"], expected["boxes"], rtol=1e-5, atol=1e-3)


def test_boxes_lie_within_each_original_image(detector):
    images = shapes_images()
    results = detector(images)
    assert len(results) == len(images)
    for image, result in zip(images, results):
        height, width = image.shape[:2]
        boxes, scores, labels = result["boxes"], result["scores"], result["labels"]
        assert 0 < len(boxes) <= 20 and boxes.dtype == np.float32
        assert boxes.shape == (len(scores), 4) and labels.shape == scores.shape
        assert np.all(boxes >= 0) and np.all(boxes[:, [0, 2]] <= width)
        assert np.all(boxes[:, [1, 3]] <= height)
        assert np.all(boxes[:, 2:] >= boxes[:, :2])
        assert np.all(scores > SCORE_THRESHOLD) and np.all(np.diff(scores) <= 0)
        assert result["class_names"] == [CLASS_NAMES[label - 1] for label in labels]


def test_boxes_are_scaled_to_the_original_image_size(detector):
    wide = shapes_images([(64, 128)])[0]
    # What the model sees: the documented bilinear resize to its 64 px input (which a 64 px
    # image passes through unchanged).
    seen = resize(wide, 64)
    expected = detector(seen)
    expected["boxes"] = expected["boxes"] * np.float32([2, 1, 2, 1])
    assert_same_detections(detector(wide), expected)


def test_a_batch_gives_the_same_detections_as_images_one_by_one(detector):
    images = shapes_images()
    for batched, image in zip(detector(images), images):
        assert_same_detections(batched, detector(image))


def test_images_of_mixed_sizes_compile_the_detector_once(detector):
    detector(shapes_images())
    detector(shapes_images([(20, 300), (256, 256)]))
    detector(shapes_images([(70, 10)])[0])
    assert detector._forward._cache_size() == 1


def test_paths_pil_images_grayscale_and_rgba_are_read_as_rgb(detector, tmp_path):
    rgb = shapes_images([(48, 80)])[0]
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    Image.fromarray(rgb).save(tmp_path / "image.png")
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=-1)
    expected = detector(rgb)
    for same in (tmp_path / "image.png", str(tmp_path / "image.png"), Image.fromarray(rgb), rgba):
        assert_same_detections(detector(same), expected)
    assert_same_detections(detector(gray), detector(np.stack([gray] * 3, axis=-1)))
    assert_same_detections(detector(gray[..., None]), detector(gray))
    assert len(detector(rgb[None])) == 1  # a [N, H, W, 3] array is a batch


def test_bad_input_is_a_value_error_naming_it(detector, tmp_path):
    good = shapes_images([(64, 64)])[0]
    (tmp_path / "corrupt.jpg").write_bytes(b"not a jpeg" * 10)
    cases = {
        "images\\[1\\] must hold uint8": [good, good.astype(np.float32)],
        "images\\[2\\] must be an image array": [good, good, good[..., :2]],
        "images\\[0\\]: cannot read image file .*corrupt.jpg": [tmp_path / "corrupt.jpg"],
        "cannot read image file .*missing.png": [tmp_path / "missing.png"],
    }
    for message, images in cases.items():
        with pytest.raises(ValueError, match=message):
            detector(images)


def test_bad_settings_are_value_errors(checkpoint):
    loaded = load_model(checkpoint)
    model, class_names = loaded.model, loaded.class_names
    with pytest.raises(ValueError, match="score_threshold"):
        Detector(model, class_names, score_threshold=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        Detector(model, class_names, batch_size=0)
    with pytest.raises(ValueError, match="unknown inference setting"):
        Detector(model, class_names, score_treshold=0.3)
    with pytest.raises(ValueError, match="6 classes but 2 class names"):
        Detector(model, ["a", "b"])


@pytest.fixture(scope="module")
def cli_run(checkpoint, tmp_path_factory):
    """Runs `ssd-jax detect` on a folder of three images of mixed sizes (one grayscale JPEG),
    a corrupt .jpg and a .txt file. Returns (inputs, out, stderr, exit code)."""
    inputs = tmp_path_factory.mktemp("inputs")
    first, second, third = shapes_images([(64, 64), (80, 120), (150, 100)])
    Image.fromarray(first).save(inputs / "a.png")
    Image.fromarray(second).save(inputs / "b.jpg")
    Image.fromarray(third).convert("L").save(inputs / "c.jpeg")
    (inputs / "corrupt.jpg").write_bytes(b"\xff\xd8 garbage" * 20)
    (inputs / "notes.txt").write_text("not an image")
    out = tmp_path_factory.mktemp("out")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["detect", "--checkpoint", str(checkpoint), str(inputs), "--out", str(out),
                     "--score-threshold", str(SCORE_THRESHOLD), "--display-threshold",
                     str(SCORE_THRESHOLD), "--batch-size", "2"])
    return inputs, out, stderr.getvalue(), code


def test_cli_writes_one_annotated_image_per_readable_input(cli_run):
    inputs, out, _, code = cli_run
    assert code == 0
    for source, written in [("a.png", "a.png"), ("b.jpg", "b.jpg"), ("c.jpeg", "c.jpg")]:
        original, annotated = Image.open(inputs / source), Image.open(out / written)
        assert annotated.size == original.size and annotated.mode == "RGB"
        assert np.any(np.asarray(annotated) != np.asarray(original.convert("RGB")))


def test_cli_detections_load_in_pycocotools(cli_run):
    inputs, out, _, _ = cli_run
    dataset = COCO(str(out / "images.json"))
    results = dataset.loadRes(str(out / "detections.json"))
    assert [c["name"] for c in dataset.loadCats(dataset.getCatIds())] == list(CLASS_NAMES)
    images = {image["file_name"]: image for image in dataset.dataset["images"]}
    assert sorted(images) == ["a.png", "b.jpg", "c.jpg"]
    assert (images["b.jpg"]["width"], images["b.jpg"]["height"]) == (120, 80)
    assert len(results.getAnnIds()) == len(json.loads((out / "detections.json").read_text())) > 0
    for image in images.values():
        annotations = results.loadAnns(results.getAnnIds(imgIds=[image["id"]]))
        assert annotations, f"no detections for {image['file_name']}"
        for annotation in annotations:
            x, y, w, h = annotation["bbox"]
            assert 0 <= x and x + w <= image["width"] + 0.01
            assert 0 <= y and y + h <= image["height"] + 0.01
            assert annotation["category_id"] in range(1, len(CLASS_NAMES) + 1)


def test_cli_reports_and_skips_unreadable_files(cli_run):
    _, out, stderr, code = cli_run
    assert code == 0
    skipped = [line for line in stderr.splitlines() if "skipped" in line]
    assert any("corrupt.jpg" in line for line in skipped)
    assert any("notes.txt" in line for line in skipped)
    assert not list(out.glob("corrupt*")) and not list(out.glob("notes*"))


def test_cli_missing_checkpoint_exits_non_zero_with_a_clear_message(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "image.png")
    run = subprocess.run(
        [sys.executable, "-m", "ssd_jax.cli", "detect", "--checkpoint", str(tmp_path / "none"),
         str(tmp_path / "image.png"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert f"error: checkpoint directory {tmp_path / 'none'} does not exist" in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_incompatible_checkpoint_exits_with_a_clear_message(tmp_path):
    manager = checkpoint_manager(tmp_path / "checkpoints")
    save(manager, 0, {"weights": np.zeros(3, np.float32)}, {"class_names": ["thing"]})
    manager.wait_until_finished()
    manager.close()
    with pytest.raises(SystemExit) as exit:
        main(["detect", "--checkpoint", str(tmp_path), str(tmp_path), "--out", str(tmp_path)])
    assert "is not a checkpoint this version of ssd_jax can load" in str(exit.value.code)


def test_cli_refuses_to_write_into_a_folder_of_its_inputs(checkpoint, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "image.png")
    with pytest.raises(SystemExit) as exit:
        main(["detect", "--checkpoint", str(checkpoint), str(tmp_path), "--out", str(tmp_path)])
    assert "would overwrite" in str(exit.value.code)
    assert Image.open(tmp_path / "image.png").getextrema() == ((0, 0),) * 3


def test_cli_keeps_what_is_in_out_and_counts_missing_inputs(tmp_path, capsys):
    """--out holding files is refused unless --overwrite; a damaged newest checkpoint step is
    one warning (the step before it is used); a missing input is counted as missing."""
    from tests.test_faults import _tear
    run = write_untrained_checkpoint(tmp_path / "run", steps=(0, 2))
    _tear(run / "checkpoints" / "2", "deleted data files")
    Image.fromarray(shapes_images([(64, 64)])[0]).save(tmp_path / "image.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "detections.json").write_text("[] from an earlier run")
    args = ["detect", "--checkpoint", str(run), str(tmp_path / "image.png"),
            str(tmp_path / "gone.png"), "--out", str(out)]
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert "already holds files (detections.json)" in str(exit.value.code)
    assert (out / "detections.json").read_text() == "[] from an earlier run"
    capsys.readouterr()
    with pytest.warns(DamagedCheckpointWarning, match="step 2 .*using step 0") as warned:
        assert main(args + ["--overwrite"]) == 0
    assert len(warned) == 1
    printed = capsys.readouterr()
    assert "(0 unreadable and 1 missing inputs skipped)" in printed.out
    assert "Traceback" not in printed.err
    assert json.loads((out / "detections.json").read_text()) is not None


def test_the_detector_refuses_what_is_not_a_model_or_an_image(detector):
    with pytest.raises(ValueError, match="model must be an ssd_jax.model.SSD"):
        Detector(None, CLASS_NAMES)
    with pytest.raises(ValueError, match="images must be an image .* or a list of them, got "
                                         "NoneType"):
        detector(None)
    image = shapes_images([(64, 64)])[0]
    encoded = io.BytesIO()
    Image.fromarray(image).save(encoded, "PNG")
    assert_same_detections(detector(encoded.getvalue()), detector(image))


def test_labels_come_in_the_checkpoints_label_space_through_its_resize(tmp_path):
    loaded = load_model(write_untrained_checkpoint(tmp_path / "run"))
    label_ids = [10, 20, 30, 40, 50, 60]
    settings = dataclasses.replace(loaded.inference, score_threshold=SCORE_THRESHOLD, top_k=20,
                                   resize="float")
    save_model(tmp_path / "peer", loaded.model, CLASS_NAMES, label_ids=label_ids,
               inference=settings)
    peer = Detector.from_checkpoint(tmp_path / "peer", batch_size=2)
    assert peer.settings == settings
    image = shapes_images([(50, 90)])[0]
    result = peer(image)
    assert len(result["labels"]) > 0 and set(result["labels"]) <= set(label_ids)
    assert result["class_names"] == [CLASS_NAMES[label_ids.index(i)] for i in result["labels"]]
    # The same detections as the model's own on the unrounded float resize.
    plain = Detector(loaded.model, CLASS_NAMES, settings, batch_size=2)
    expected = plain(image)
    np.testing.assert_array_equal(result["labels"], np.asarray(label_ids)[expected["labels"] - 1])
    np.testing.assert_allclose(result["scores"], expected["scores"], rtol=1e-6)
    rounded = Detector(loaded.model, CLASS_NAMES, settings, batch_size=2, resize="uint8")(image)
    assert not np.array_equal(rounded["scores"], expected["scores"])
