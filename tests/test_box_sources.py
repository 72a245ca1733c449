"""`train.box_sources`: detection examples from COCO-format JSON and Pascal VOC XML, and what is clipped, dropped or
refused on the way in."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from train.box_sources import CocoSource, VocBoxSource, write_coco
from train.data import DataError
from train.datasets.digit_canvases import place_digits


def _canvases(n=4):
    rng = np.random.default_rng(0)
    digits = (rng.random((10, 28, 28)) > 0.6).astype(np.uint8) * 255  # blobs stand in for digits
    return [place_digits(digits, np.arange(10), np.random.default_rng([1, i]), (48, 64), count=(2, 3), scale=(0.3, 0.45))
            for i in range(n)]


def test_written_canvases_read_back_with_their_boxes(tmp_path):
    canvases = _canvases()
    path = write_coco(tmp_path, [c.image for c in canvases], [c.boxes for c in canvases],
                      [c.classes for c in canvases], [str(d) for d in range(10)])
    source = CocoSource(path, tmp_path / "images")
    assert len(source) == 4 and source.num_classes == 10 and source.category_ids == tuple(range(1, 11))
    for k, c in enumerate(canvases):
        ex = source.example(k)
        np.testing.assert_allclose(ex["boxes"], c.boxes, atol=1e-4)
        np.testing.assert_array_equal(ex["classes"], c.classes)
        assert Image.open(ex["image"]).size == (64, 48)
    assert sum(len(c.boxes) for c in canvases) > 4  # several digits per canvas


def _coco(tmp_path, annotations, categories=({"id": 3, "name": "cat"}, {"id": 7, "name": "dog"})):
    (tmp_path / "images").mkdir(exist_ok=True)
    for k in (1, 2):
        Image.new("RGB", (40, 30)).save(tmp_path / "images" / f"{k}.jpg")
    images = [{"id": 1, "file_name": "1.jpg", "width": 40, "height": 30}, {"id": 2, "file_name": "2.jpg"}]
    (tmp_path / "a.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                 "categories": list(categories)}))
    return tmp_path / "a.json"


def test_coco_clips_drops_and_counts(tmp_path, caplog):
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [30, 20, 20, 20]},  # reaches outside: clipped
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 10]},  # no area: dropped
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "iscrowd": 1},  # crowd: dropped
            {"id": 4, "image_id": 9, "category_id": 3, "bbox": [1, 2, 3, 4]}]  # no such image: dropped
    with caplog.at_level(logging.INFO, logger="train.box_sources"):
        source = CocoSource(_coco(tmp_path, anns), tmp_path / "images")
    first, second = source.example(0), source.example(1)
    np.testing.assert_array_equal(first["boxes"], [[30, 20, 40, 30]])  # clipped to 40 x 30
    assert first["classes"].tolist() == [1]  # category 7 is the second declared: class 1
    assert second["boxes"].shape == (0, 4)  # an image without boxes stays, as a negative
    said = caplog.text
    for what in ("1 boxes clipped", "1 boxes of no area", "1 crowd regions", "1 naming an image not listed",
                 "1 images without boxes"):
        assert what in said, said


def test_coco_refuses_what_cannot_be_used(tmp_path):
    with pytest.raises(DataError, match="annotation 5 has category_id 4, which its 'categories' do not declare"):
        CocoSource(_coco(tmp_path, [{"id": 5, "image_id": 1, "category_id": 4, "bbox": [1, 1, 2, 2]}]),
                   tmp_path / "images")
    path = _coco(tmp_path, [])
    (tmp_path / "images" / "2.jpg").unlink()
    with pytest.raises(DataError, match=r"image 2 is .*2\.jpg, which does not exist"):
        CocoSource(path, tmp_path / "images")
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read the COCO annotations"):
        CocoSource(tmp_path / "b.json", tmp_path / "images")


def _voc(root, objects):
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (50, 40)).save(root / "JPEGImages" / "a.jpg")
    xml = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                  f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, d, b in objects)
    (root / "Annotations" / "a.xml").write_text(
        f"<annotation><size><width>50</width><height>40</height></size>{xml}</annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\n")


def test_voc_boxes_from_one_based_pixels(tmp_path, caplog):
    _voc(tmp_path, [("dog", 0, (1, 1, 10, 20)), ("person", 1, (5, 5, 9, 9)), ("cat", 0, (40, 30, 60, 45))])
    with caplog.at_level(logging.INFO, logger="train.box_sources"):
        source = VocBoxSource(tmp_path, "train")
    ex = source.example(0)
    # VOC's pixels 1..10 are [0, 10) in continuous coordinates; the cat reaches outside and is clipped
    np.testing.assert_array_equal(ex["boxes"], [[0, 0, 10, 20], [39, 29, 50, 40]])
    assert ex["classes"].tolist() == [11, 7]  # dog, cat in VOC's order
    assert "1 difficult objects" in caplog.text and "1 boxes clipped" in caplog.text
    _voc(tmp_path, [("unicorn", 0, (1, 1, 2, 2))])
    with pytest.raises(DataError, match="a.xml: object class 'unicorn' is not one of the dataset's classes"):
        VocBoxSource(tmp_path, "train")
    with pytest.raises(DataError, match="no split list"):
        VocBoxSource(tmp_path, "val")
