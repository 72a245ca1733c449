"""`train.coco_eval`: COCO's box metrics from faster-coco-eval on cases whose AP follows from the protocol by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from train.coco_eval import STATS, coco_box_metrics

GT = [{"boxes": [[0, 0, 10, 10], [10, 10, 120, 120]], "classes": [1, 2]},  # a small box and a large one
      {"boxes": [[5, 5, 45, 45]], "classes": [1]}]  # medium (40 x 40)


def _found(boxes, scores, labels, **extra):
    return {"boxes": np.asarray(boxes, float).reshape(-1, 4), "scores": np.asarray(scores, float),
            "labels": np.asarray(labels), **extra}


def test_detecting_every_box_exactly_is_ap_1():
    dets = [_found(GT[0]["boxes"], [0.9, 0.8], [1, 2]), _found(GT[1]["boxes"], [0.7], [1])]
    m = coco_box_metrics(GT, dets)
    assert set(m) == set(STATS)
    for name in ("map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar100"):
        assert m[name] == pytest.approx(1.0), name


def test_a_box_at_iou_063_counts_at_three_of_ten_thresholds():
    gt = [{"boxes": [[0, 0, 100, 100]], "classes": [3]}]
    m = coco_box_metrics(gt, [_found([[0, 0, 100, 63]], [0.9], [3])])  # IoU 0.63: matched at 0.50, 0.55, 0.60
    assert m["map"] == pytest.approx(0.3) and m["ap50"] == pytest.approx(1.0) and m["ap75"] == 0.0
    assert m["ap_large"] == pytest.approx(0.3)
    assert math.isnan(m["ap_small"]) and math.isnan(m["ap_medium"])  # no ground truth of these sizes


def test_wrong_class_padding_and_ranking():
    # the class-2 box found as class 1 is a false positive of class 1 and a miss of class 2
    dets = [_found([[10, 10, 120, 120], [0, 0, 10, 10], [0, 0, 0, 0]], [0.95, 0.9, 0.99], [1, 1, 1],
                   valid=np.array([True, True, False])),  # the padded row is not a detection
            _found(GT[1]["boxes"], [0.8], [1])]
    m = coco_box_metrics(GT, dets)
    # class 1: two hits ranked below one false positive: precision 1/2 then 2/3 at recall 1/2 and 1, interpolated
    # (COCO keeps the best precision at each recall and beyond): 101 recall points, 0..50 at 2/3, 51..100 at 2/3
    # -> AP 2/3 at every threshold; class 2: AP 0 -> mAP 1/3
    assert m["map"] == pytest.approx(1 / 3, abs=1e-6)
    assert m["ap_large"] == 0.0  # the only large box (class 2) was missed


def test_nothing_detected_and_bad_input():
    m = coco_box_metrics(GT, [_found(np.zeros((0, 4)), [], []), _found(np.zeros((0, 4)), [], [])])
    assert m["map"] == 0.0 and m["ap50"] == 0.0
    with pytest.raises(ValueError, match="2 ground-truth images but 1 detection entries"):
        coco_box_metrics(GT, [_found([[0, 0, 1, 1]], [1.0], [1])])
    with pytest.raises(ValueError, match="has no area"):
        coco_box_metrics([{"boxes": [[5, 5, 5, 9]], "classes": [1]}], [_found([[0, 0, 1, 1]], [1.0], [1])])
