"""Detection data from tensorflow-datasets by name (`tfds:coco/2017`, `tfds:voc/2007`): boxes from tfds's normalized
(ymin, xmin, ymax, xmax) to pixels, crowd and difficult objects dropped, served by tfds's own mock of the dataset."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from train.data import DataError
from train.sources import TfdsSource, open_source
from train.tfds_boxes import TfdsBoxSource

tfds = pytest.importorskip("tensorflow_datasets")


def _coco_record(bbox, labels, crowd):
    return {"image": np.full((40, 60, 3), 7, np.uint8), "image/filename": b"x.jpg", "image/id": 1,
            "objects": {"area": np.ones(len(labels), np.int64), "bbox": np.asarray(bbox, np.float32),
                        "id": np.arange(len(labels)), "is_crowd": np.asarray(crowd, bool),
                        "label": np.asarray(labels, np.int64)}}


def test_coco_by_name_gives_pixel_boxes_without_crowds_or_empty_boxes(caplog):
    records = [_coco_record([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.3, 0.9], [0.5, 0.5, 1.2, 1.1]],
                            [5, 7, 9, 79], [False, True, False, False])]
    with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: records), caplog.at_level(logging.INFO):
        source = open_source("tfds:coco/2017", "validation")
        assert isinstance(source, TfdsBoxSource) and source.num_classes == 80 and len(source) == 1
        ex = source.example(0)
    assert ex["image"].shape == (40, 60, 3)
    # (ymin, xmin, ymax, xmax) x (h, w) -> (x1, y1, x2, y2); the crowd region and the box of no height dropped; the
    # last one clipped to the image
    np.testing.assert_allclose(ex["boxes"], [[12, 4, 36, 20], [30, 20, 60, 40]], atol=1e-4)
    np.testing.assert_array_equal(ex["classes"], [5, 79])
    assert ex["classes"].dtype == np.int32 and ex["boxes"].dtype == np.float32
    logged = caplog.text
    assert "dropping crowd regions" in logged and "dropping boxes of no area" in logged


def test_voc_by_name_drops_difficult_objects():
    record = {"image": np.zeros((20, 10, 3), np.uint8), "image/filename": b"y.jpg",
              "labels": np.array([3, 4]), "labels_no_difficult": np.array([3]),
              "objects": {"bbox": np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], np.float32),
                          "is_difficult": np.array([False, True]), "is_truncated": np.array([False, False]),
                          "label": np.array([3, 4]), "pose": np.array([0, 0])}}
    with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: [record]):
        source = open_source("tfds:voc/2007", "test")
        ex = source.example(0)
    assert source.num_classes == 20
    np.testing.assert_allclose(ex["boxes"], [[0, 0, 5, 10]])
    np.testing.assert_array_equal(ex["classes"], [3])


def test_labelled_datasets_still_open_as_classification_and_bad_classes_are_errors():
    records = [{"image": np.zeros((28, 28, 1), np.uint8), "label": 3}]
    with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: records):
        assert type(open_source("tfds:mnist", "train")) is TfdsSource
    bad = [_coco_record([[0.1, 0.1, 0.5, 0.5]], [80], [False])]
    with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: bad):
        source = open_source("tfds:coco/2017", "train")
        with pytest.raises(DataError, match="class 80, outside the dataset's 80 classes"):
            source.example(0)
