import numpy as np
import pytest
from hypothesis import given, strategies as st

from reference.voc_eval import average_precision, devkit_iou, evaluate_detections

C = 3


def gt(boxes, labels, difficult=None, image_size=None):
    entry = {"boxes": np.asarray(boxes, float).reshape(-1, 4), "labels": np.asarray(labels, int)}
    if difficult is not None:
        entry["difficult"] = np.asarray(difficult, bool)
    if image_size is not None:
        entry["image_size"] = image_size
    return entry


def det(boxes, scores, labels):
    return {"boxes": np.asarray(boxes, float).reshape(-1, 4),
            "scores": np.asarray(scores, float), "labels": np.asarray(labels, int)}


def both_metrics(detections, ground_truths, num_classes=1, **kwargs):
    return [evaluate_detections(detections, ground_truths, num_classes, use_07_metric=m, **kwargs)
            for m in (True, False)]


# Boxes on a 0.1 grid, so distinct boxes are clearly distinct.
grid_boxes = st.tuples(st.integers(0, 8), st.integers(0, 8), st.integers(1, 4), st.integers(1, 4)
                       ).map(lambda b: (b[0] / 10, b[1] / 10, min(b[0] + b[2], 10) / 10,
                                        min(b[1] + b[3], 10) / 10))
image_sizes = st.one_of(st.none(), st.tuples(st.integers(20, 500), st.integers(20, 500)))


@st.composite
def annotated_images(draw):
    """Up to 4 images, each with up to 5 distinct ground-truth boxes of random class and flag."""
    images = []
    for _ in range(draw(st.integers(1, 4))):
        boxes = draw(st.lists(grid_boxes, max_size=5, unique=True))
        labels = draw(st.lists(st.integers(1, C), min_size=len(boxes), max_size=len(boxes)))
        difficult = draw(st.lists(st.booleans(), min_size=len(boxes), max_size=len(boxes)))
        images.append(gt(boxes, labels, difficult, draw(image_sizes)))
    return images


def classes_with_positives(ground_truths):
    return {int(label) for image in ground_truths
            for label, hard in zip(image["labels"], image["difficult"]) if not hard}


@given(annotated_images(), st.randoms(use_true_random=False))
def test_perfect_detections_have_ap_one_with_both_metrics(ground_truths, random):
    detections = [det(image["boxes"], [random.random() for _ in image["labels"]], image["labels"])
                  for image in ground_truths]
    with_positives = classes_with_positives(ground_truths)
    for result in both_metrics(detections, ground_truths, C):
        for label in range(1, C + 1):
            if label in with_positives:
                assert result["ap"][label - 1] == 1.0
            else:
                assert np.isnan(result["ap"][label - 1])
        assert result["map"] == 1.0 or (not with_positives and np.isnan(result["map"]))


@given(annotated_images(), st.data())
def test_ap_is_invariant_to_the_order_of_detections_and_images(ground_truths, data):
    num_detections = [data.draw(st.integers(0, 6)) for _ in ground_truths]
    # Distinct scores: with ties the ranking (and so AP) legitimately follows list order.
    ranks = iter(data.draw(st.permutations(range(sum(num_detections)))))
    detections = []
    for image, k in zip(ground_truths, num_detections):
        # Some detections copy an object's box, so true positives and duplicates occur.
        object_boxes = [tuple(b) for b in image["boxes"]]
        box = st.one_of(grid_boxes, st.sampled_from(object_boxes)) if object_boxes else grid_boxes
        boxes = data.draw(st.lists(box, min_size=k, max_size=k))
        labels = data.draw(st.lists(st.integers(1, C), min_size=k, max_size=k))
        detections.append(det(boxes, [(next(ranks) + 1) / (sum(num_detections) + 1)
                                      for _ in range(k)], labels))
    shuffled_dets, shuffled_gts = [], []
    for i in data.draw(st.permutations(range(len(ground_truths)))):
        order = data.draw(st.permutations(range(num_detections[i])))
        shuffled_dets.append({key: value[list(order)] for key, value in detections[i].items()})
        shuffled_gts.append(ground_truths[i])
    for use_07_metric in (True, False):
        result = evaluate_detections(detections, ground_truths, C, use_07_metric=use_07_metric)
        shuffled = evaluate_detections(shuffled_dets, shuffled_gts, C,
                                       use_07_metric=use_07_metric)
        np.testing.assert_allclose(shuffled["ap"], result["ap"], rtol=0, atol=1e-12)
        defined = ~np.isnan(result["ap"])
        assert np.all((result["ap"][defined] >= 0) & (result["ap"][defined] <= 1))
        if defined.any():
            assert result["map"] == pytest.approx(result["ap"][defined].mean())


# Hand-computed curve: 4 positives; ranked detections TP, FP, TP, TP, FP, FP.
#   recall    .25  .25  .50  .75  .75  .75
#   precision 1    .50  2/3  .75  .60  .50
# 11-point: t = 0, .1, .2 -> 1; t = .3 ... .7 -> .75 (5 thresholds); t = .8, .9, 1 -> 0
#   AP = (3 * 1 + 5 * .75) / 11 = 6.75 / 11
# Area: envelope 1 on (0, .25], .75 on (.25, .75], 0 above; AP = .25 * 1 + .5 * .75 = .625
HAND_RECALL = [.25, .25, .5, .75, .75, .75]
HAND_PRECISION = [1, .5, 2 / 3, .75, .6, .5]


def test_11_point_ap_of_a_hand_computed_curve():
    assert average_precision(HAND_RECALL, HAND_PRECISION, True) == pytest.approx(6.75 / 11)


def test_area_ap_of_a_hand_computed_curve():
    assert average_precision(HAND_RECALL, HAND_PRECISION, False) == pytest.approx(0.625)


def test_evaluation_of_hand_built_detections_gives_the_hand_computed_curve():
    # Four images with one object each; the object of image 3 is never found.
    box, elsewhere = [.1, .1, .5, .5], [.6, .6, .9, .9]
    ground_truths = [gt([box], [1]) for _ in range(4)]
    detections = [det([box, elsewhere, elsewhere], [.9, .8, .5], [1, 1, 1]),  # TP, FP, FP
                  det([box], [.7], [1]),                                      # TP
                  det([box, elsewhere], [.6, .4], [1, 1]),                    # TP, FP
                  det(np.zeros((0, 4)), [], [])]
    ap07, ap10 = both_metrics(detections, ground_truths)
    assert ap07["map"] == pytest.approx(6.75 / 11)
    assert ap10["map"] == pytest.approx(0.625)


def test_11_point_thresholds_are_the_devkits_accumulated_floats():
    # np.arange(0, 1.1, 0.1)[3] is 0.30000000000000004 > 0.3: a recall of
    # exactly 3/10 reaches t = 0, .1, .2 only, as in the devkit.
    assert average_precision([0.3], [1.0], True) == pytest.approx(3 / 11)
    assert average_precision([0.31], [1.0], True) == pytest.approx(4 / 11)


def test_empty_curve_has_ap_zero():
    assert average_precision([], [], True) == 0.0
    assert average_precision([], [], False) == 0.0


def test_duplicate_detections_are_false_positives():
    # Objects A (image 0) and B (image 1); A is detected twice, above B:
    #   recall .5 .5 1, precision 1 .5 2/3
    #   11-point: (6 * 1 + 5 * 2/3) / 11; area: .5 * 1 + .5 * 2/3 = 5/6
    a, b = [.1, .1, .4, .4], [.5, .5, .9, .9]
    ground_truths = [gt([a], [1]), gt([b], [1])]
    detections = [det([a, a], [.9, .8], [1, 1]), det([b], [.7], [1])]
    ap07, ap10 = both_metrics(detections, ground_truths)
    assert ap07["map"] == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert ap10["map"] == pytest.approx(5 / 6)


def test_difficult_objects_neither_count_as_positives_nor_penalize():
    a, hard = [.1, .1, .4, .4], [.5, .5, .9, .9]
    # The difficult object is detected twice above the real one and that is
    # ignored; the real one is found: AP 1.
    detections = [det([hard, hard, a], [.9, .85, .8], [1, 1, 1])]
    assert all(r["map"] == 1.0 for r in both_metrics(detections, [gt([a, hard], [1, 1], [0, 1])]))
    # Not detecting it at all costs nothing either.
    detections = [det([a], [.8], [1])]
    assert all(r["map"] == 1.0 for r in both_metrics(detections, [gt([a, hard], [1, 1], [0, 1])]))
    # Without the flag the same detections lose recall.
    assert all(r["map"] < 1.0 for r in both_metrics(detections, [gt([a, hard], [1, 1], [0, 0])]))


def test_classes_without_non_difficult_objects_are_nan_and_left_out_of_the_map():
    a, b = [.1, .1, .4, .4], [.5, .5, .9, .9]
    # Class 1 found (AP 1), class 2 only difficult, class 3 absent, class 4 missed (AP 0).
    ground_truths = [gt([a, b, b], [1, 2, 4], [0, 1, 0])]
    detections = [det([a, b], [.9, .8], [1, 2])]
    for result in both_metrics(detections, ground_truths, num_classes=4):
        np.testing.assert_array_equal(result["ap"], [1.0, np.nan, np.nan, 0.0])
        assert result["map"] == 0.5
    only_difficult = [gt([a], [1], [1])]
    for result in both_metrics([det([a], [.9], [1])], only_difficult, num_classes=2):
        assert np.isnan(result["ap"]).all() and np.isnan(result["map"])


def test_devkit_iou_counts_pixels_inclusively():
    # Pixels 0..9 are 10 wide: [0, 0, 9, 4.2] covers 10 x 5.2 of the 10 x 10 box.
    assert devkit_iou(np.array([0, 0, 9, 4.2]), np.array([[0., 0, 9, 9]]), 1.0) == \
        pytest.approx([0.52])
    assert devkit_iou(np.array([0, 0, 9, 4.2]), np.array([[0., 0, 9, 9]]), 0.0) == \
        pytest.approx([4.2 / 9])
    # Boxes sharing the pixel column 9 overlap by 10 pixels out of 190.
    assert devkit_iou(np.array([9., 0, 18, 9]), np.array([[0., 0, 9, 9]]), 1.0) == \
        pytest.approx([10 / 190])
    assert devkit_iou(np.array([.5, 0, 1, 1]), np.array([[0., 0, .5, 1]]), 0.0) == [0.0]


def test_plus_one_pixel_convention_decides_a_small_box_at_the_threshold():
    # In a 100 x 100 image the object covers pixels 0..9; the detection rows
    # 0..4.2: IoU .52 > .5 with the devkit's +1, 4.2 / 9 = .47 without.
    ground_truth = [[0, 0, .09, .09]]
    detections = [det([[0, 0, .09, .042]], [.9], [1])]
    assert both_metrics(detections, [gt(ground_truth, [1], image_size=(100, 100))])[0]["map"] == 1
    assert both_metrics(detections, [gt(ground_truth, [1])])[0]["map"] == 0


def test_a_match_needs_iou_strictly_above_the_threshold():
    ground_truths = [gt([[0, 0, 1, 1]], [1])]
    half = [det([[0, 0, .5, 1]], [.9], [1])]  # IoU exactly .5
    assert both_metrics(half, ground_truths)[0]["map"] == 0
    assert both_metrics(half, ground_truths, iou_threshold=0.49)[0]["map"] == 1


def test_equal_scores_rank_in_image_order_then_list_order():
    # A miss and a hit with the same score: the one listed first ranks first.
    a, miss = [.1, .1, .4, .4], [.6, .6, .9, .9]
    ground_truths = [gt([a], [1])]
    hit_first = both_metrics([det([a, miss], [.5, .5], [1, 1])], ground_truths)
    miss_first = both_metrics([det([miss, a], [.5, .5], [1, 1])], ground_truths)
    assert hit_first[1]["map"] == 1.0
    assert miss_first[1]["map"] == 0.5


def test_image_size_is_height_then_width():
    # Object pixels x 0..9, y 0..9 in a 100-high, 200-wide image; detection x
    # 0..3.8: IoU 4.8 / 10 = .48 -> missed. Read as 200 high, 100 wide the
    # detection would cover 2.9 of 5.5 columns, IoU .53 -> found.
    ground_truth = [[0, 0, 9 / 200, 9 / 100]]
    detections = [det([[0, 0, 3.8 / 200, 9 / 100]], [.9], [1])]
    assert both_metrics(detections, [gt(ground_truth, [1], image_size=(100, 200))])[0]["map"] == 0
    assert both_metrics(detections, [gt(ground_truth, [1], image_size=(200, 100))])[0]["map"] == 1


def _valid():
    return [det([[.1, .1, .4, .4]], [.9], [1])], [gt([[.1, .1, .4, .4]], [1], [0], (100, 100))]


@pytest.mark.parametrize("corrupt, message", [
    (lambda d, g: g.append(gt([[.1, .1, .2, .2]], [1])), "one entry per image"),
    (lambda d, g: d[0].pop("scores"), "missing key"),
    (lambda d, g: g[0].pop("labels"), "missing key"),
    (lambda d, g: d[0].update(boxes=np.zeros((1, 3))), r"detections\[0\]\['boxes'\]"),
    (lambda d, g: d[0].update(scores=np.zeros(2)), r"detections\[0\]\['scores'\]"),
    (lambda d, g: d[0].update(labels=np.array([0])), r"detections\[0\]\['labels'\]"),
    (lambda d, g: g[0].update(labels=np.array([C + 1])), r"ground_truths\[0\]\['labels'\]"),
    (lambda d, g: g[0].update(boxes=np.array([[.4, .1, .1, .4]])), "degenerate"),
    (lambda d, g: g[0].update(difficult=np.array([0, 1])), "difficult"),
    (lambda d, g: g[0].update(difficult=np.array([2])), "difficult"),
    (lambda d, g: g[0].update(image_size=(0, 100)), "image_size"),
    (lambda d, g: d.__setitem__(0, [1, 2]), "must be a dict"),
])
def test_bad_input_raises_value_error_naming_the_problem(corrupt, message):
    detections, ground_truths = _valid()
    corrupt(detections, ground_truths)
    with pytest.raises(ValueError, match=message):
        evaluate_detections(detections, ground_truths, C)


def test_bad_arguments_raise_value_error():
    detections, ground_truths = _valid()
    with pytest.raises(ValueError, match="num_classes"):
        evaluate_detections(detections, ground_truths, 0)
    with pytest.raises(ValueError, match="iou_threshold"):
        evaluate_detections(detections, ground_truths, C, iou_threshold=1.5)
    with pytest.raises(ValueError, match="list"):
        evaluate_detections(detections[0], ground_truths, C)
    with pytest.raises(ValueError, match="precision"):
        average_precision([.5, 1.0], [1.0], True)


def test_returned_curves_are_the_hand_computed_curve():
    box, elsewhere = [.1, .1, .5, .5], [.6, .6, .9, .9]
    ground_truths = [gt([box], [1]) for _ in range(4)] + [gt([box], [2], [1])]
    detections = [det([box, elsewhere, elsewhere], [.9, .8, .5], [1, 1, 1]),
                  det([box], [.7], [1]), det([box, elsewhere], [.6, .4], [1, 1]),
                  det(np.zeros((0, 4)), [], []), det([box], [.9], [2])]
    result = evaluate_detections(detections, ground_truths, 3, return_curves=True)
    np.testing.assert_allclose(result["recall"][0], HAND_RECALL)
    np.testing.assert_allclose(result["precision"][0], HAND_PRECISION)
    assert result["recall"][1:] == [None, None] and result["precision"][1:] == [None, None]
    assert "recall" not in evaluate_detections(detections, ground_truths, 3)


@given(annotated_images(), st.data())
def test_returned_curves_reproduce_each_ap(ground_truths, data):
    detections = []
    for image in ground_truths:
        object_boxes = [tuple(b) for b in image["boxes"]]
        box = st.one_of(grid_boxes, st.sampled_from(object_boxes)) if object_boxes else grid_boxes
        boxes = data.draw(st.lists(box, max_size=6))
        scores = data.draw(st.lists(st.floats(0, 1), min_size=len(boxes), max_size=len(boxes)))
        labels = data.draw(st.lists(st.integers(1, C), min_size=len(boxes), max_size=len(boxes)))
        detections.append(det(boxes, scores, labels))
    for use_07_metric in (True, False):
        result = evaluate_detections(detections, ground_truths, C, use_07_metric=use_07_metric,
                                     return_curves=True)
        for ap, recall, precision in zip(result["ap"], result["recall"], result["precision"]):
            if np.isnan(ap):
                assert recall is None and precision is None
            else:
                assert recall.shape == precision.shape
                assert np.all(np.diff(recall) >= 0) and np.all((precision >= 0) & (precision <= 1))
                assert average_precision(recall, precision, use_07_metric) == ap
