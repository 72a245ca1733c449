"""Segmentation data: the mask-aware transforms keep image and mask aligned, the sources read the VOC and images/masks
layouts (and tfds masks by key), bad inputs fail naming the file, and the digit canvases read back from disk as written.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import train
from train.data import DataError, Loader
from train.datasets.digit_canvases import CLASS_NAMES, digit_canvases, place_digits, write_digit_canvases
from train.mask_sources import MaskFolderSource, VocSource, write_voc
from train.mask_transforms import SegmentationTransform
from train.sources import ArraySource, as_source, has_split, open_source
from train.tasks import Segmentation
from train.transforms import MASK_IGNORE

STEP = 20  # gray level per class in the drawings below: class = gray // STEP


def _drawing(rng, h=30, w=40, classes=6):
    """A gray image of random rectangles whose gray level names their class (class * STEP), and that mask."""
    mask = np.zeros((h, w), np.uint8)
    for _ in range(8):
        y0, x0 = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        mask[y0:y0 + int(rng.integers(3, 14)), x0:x0 + int(rng.integers(3, 14))] = rng.integers(1, classes)
    return (mask * STEP).astype(np.uint8), mask


def _transform(train_mode, **kw):
    return SegmentationTransform(size=(24, 28), mean=(0.0,), std=(1.0,), channels=1, train=train_mode,
                                 num_classes=6, **kw)


def _derived(out):
    """The mask the transformed image itself implies, and the padded region (mask MASK_IGNORE)."""
    gray = np.rint(out["image"][..., 0] * 255).astype(np.int64)
    return gray // STEP, out["mask"] == MASK_IGNORE


def test_crop_flip_and_scale_keep_the_mask_on_the_image():
    tf = _transform(True, interpolation="nearest", scale_range=(0.5, 2.0), crop_size=(20, 22))
    flipped = padded = 0
    for seed in range(40):
        img, mask = _drawing(np.random.default_rng(seed))
        ex = {"image": img, "mask": mask}
        out = tf(ex, np.random.default_rng([3, seed]))
        again = tf(ex, np.random.default_rng([3, seed]))
        np.testing.assert_array_equal(out["image"], again["image"])  # deterministic given the generator
        np.testing.assert_array_equal(out["mask"], again["mask"])
        assert out["image"].shape == (20, 22, 1) and out["mask"].shape == (20, 22) and out["mask"].dtype == np.int32
        derived, pad = _derived(out)
        np.testing.assert_array_equal(out["mask"][~pad], derived[~pad])
        assert np.all(out["image"][pad] == 0.0)  # padding: the mean (0 after normalization) and the ignore index
        padded += pad.any()
        ramp = np.tile(np.arange(40, dtype=np.uint8) * 6, (30, 1))  # decreasing after a flip
        probe = tf({"image": ramp, "mask": np.zeros((30, 40), np.uint8)}, np.random.default_rng([3, seed]))
        flipped += probe["image"][0, 0, 0] > probe["image"][0, 1, 0]
    assert 5 < flipped < 35 and padded > 3  # both branches of the flip, and scales below the crop, were drawn


def test_bilinear_images_keep_nearest_masks_and_eval_resizes_to_the_model_size():
    tf = _transform(True, interpolation="bilinear", scale_range=(0.8, 1.6))
    for seed in range(10):
        img, mask = _drawing(np.random.default_rng(seed))
        out = tf({"image": img, "mask": mask}, np.random.default_rng(seed))
        assert set(np.unique(out["mask"])) <= set(range(6)) | {MASK_IGNORE}  # nearest: no class is invented
        derived, pad = _derived(out)
        inside = ~pad
        # away from edges, where bilinear blends two gray levels, the mask is the image's
        assert np.mean(out["mask"][inside] == derived[inside]) > 0.85
    ev = _transform(False, interpolation="nearest")
    img, mask = _drawing(np.random.default_rng(0))
    out = ev({"image": img, "mask": mask}, None)
    derived, pad = _derived(out)
    assert out["image"].shape == (24, 28, 1) and not pad.any()
    np.testing.assert_array_equal(out["mask"], derived)
    assert ev(img, None).shape == (24, 28, 1)  # a bare image: the evaluation image


def test_bad_masks_are_named(tmp_path):
    root = write_voc(tmp_path / "voc", [np.zeros((16, 20, 3), np.uint8)] * 4, [np.ones((16, 20), np.uint8)] * 4,
                     {"train": range(4)}, class_names=("bg", "a", "b"))
    masks = root / "SegmentationClass"
    Image.fromarray(np.ones((16, 18), np.uint8)).save(masks / "000001.png")  # wrong size
    Image.fromarray(np.full((16, 20), 7, np.uint8)).save(masks / "000002.png")  # class 7 of 3
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(masks / "000003.png")  # colours
    src = VocSource(root, "train")
    assert src.num_classes == 3 and Image.open(masks / "000000.png").mode == "P"
    tf, _ = Segmentation(3).transforms(train.DataConfig(), _model_cfg(3))
    tf(src.example(0), np.random.default_rng(0))  # the palette mask is read as indices
    loader = Loader(src, tf, 1)
    with pytest.raises(DataError, match=r"example 1: mask .*000001.png is 16x18 but image .*000001.jpg is 16x20"):
        loader._example(1, np.random.default_rng(0))
    with pytest.raises(DataError, match=r"mask .*000002.png holds class id 7 .* the model has 3 classes .*255 for "
                                        r"pixels to ignore"):
        loader._example(2, np.random.default_rng(0))
    with pytest.raises(DataError, match=r"mask .*000003.png is a RGB image \(colours\), not an index mask"):
        loader._example(3, None)
    # before training, the task reads the masks and names the first bad file
    with pytest.raises(DataError, match=r"training data .*example 1: mask .*000001.png is 16x18 but image"):
        Segmentation(3).validate(src, _model_cfg(3))
    with pytest.raises(DataError, match=r"holds class id 7"):
        Segmentation(3).validate(src.subset(np.arange(2, 4), "bad"), _model_cfg(3))
    # an image without its mask, in both layouts
    (masks / "000000.png").unlink()
    with pytest.raises(DataError, match=r"image .*JPEGImages/000000.jpg has no mask: .*SegmentationClass/000000.png"):
        VocSource(root, "train")
    with pytest.raises(DataError, match=r"no split 'val'.*\(splits: train\)"):
        VocSource(root, "val")
    flat = tmp_path / "flat"
    for sub in ("images", "masks"):
        (flat / sub).mkdir(parents=True)
    for stem in ("a", "b"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / "images" / f"{stem}.jpg")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(flat / "masks" / "a.png")
    with pytest.raises(DataError, match=r"image .*images/b.jpg has no mask: expected .*masks/b.png"):
        MaskFolderSource(flat)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(flat / "masks" / "b.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(flat / "masks" / "c.png")
    with pytest.raises(DataError, match=r"mask .*masks/c.png has no image"):
        MaskFolderSource(flat)
    # in-memory masks: a colour mask and a class out of range, before training
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(DataError, match=r"the mask has shape \(8, 8, 3\): a 3-channel \(colour\) mask"):
        Segmentation(3).validate(ArraySource(images, targets={"mask": np.zeros((2, 8, 8, 3), np.uint8)}),
                                 _model_cfg(3))
    with pytest.raises(DataError, match=r"example 1: the mask holds class id 3"):
        Segmentation(3).validate(as_source((images, np.stack([np.zeros((8, 8)), np.full((8, 8), 3)]).astype(int)),
                                           "arrays"), _model_cfg(3))


def test_digit_canvases_read_back_from_the_voc_layout(tmp_path, mnist5k):
    (xtr, ytr), (xte, yte) = mnist5k
    canvases = digit_canvases(6, (xtr, ytr), size=48, seed=0)
    for c in canvases:  # boxes are the digits' pixels, the classes their mask values
        assert len(c.boxes) == len(c.classes) >= 1
        for (x0, y0, x1, y1), k in zip(c.boxes.astype(int), c.classes):
            inside = c.mask[y0:y1, x0:x1]
            assert set(np.unique(inside)) <= {0, k + 1}  # no overlap
            ys, xs = np.nonzero(inside == k + 1)  # tight: the digit's pixels touch every side of its box
            assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == (0, 0, y1 - y0, x1 - x0)
        assert set(np.unique(c.mask)) == {0, *(c.classes + 1)}
    again = place_digits(xtr, ytr, np.random.default_rng([0, 3]), (48, 48))
    np.testing.assert_array_equal(again.image, canvases[3].image)  # canvas i depends only on (seed, i)
    root = write_digit_canvases(tmp_path / "canvases", train=6, val=2, size=48, digits=((xtr, ytr), (xte, yte)))
    src = open_source(f"folder:{root}", "train")
    assert isinstance(src, VocSource) and len(src) == 6 and src.num_classes == 11 and src.class_names == CLASS_NAMES
    assert has_split(str(root), "val") and not has_split(str(root), "test")
    assert len(open_source(str(root), "val")) == 2
    for i, c in enumerate(canvases):
        ex = src.example(i)
        assert Image.open(ex["mask"]).mode == "P"
        np.testing.assert_array_equal(np.asarray(Image.open(ex["mask"])), c.mask)  # indices, not colours
        assert np.abs(np.asarray(Image.open(ex["image"]), np.float32) - c.image).mean() < 5  # JPEG of pixel noise
    # the images/ + masks/ layout with splits reads the same pairs
    flat = tmp_path / "flat" / "train"
    for sub in ("images", "masks"):
        (flat / sub).mkdir(parents=True)
    for i, c in enumerate(canvases[:3]):
        Image.fromarray(c.image).save(flat / "images" / f"{i}.png")
        Image.fromarray(c.mask).save(flat / "masks" / f"{i}.png")
    (flat.parent / "labels.txt").write_text("\n".join(CLASS_NAMES))
    mf = open_source(str(flat.parent), "train")
    assert isinstance(mf, MaskFolderSource) and len(mf) == 3 and mf.num_classes == 11  # labels.txt of the root
    np.testing.assert_array_equal(np.asarray(Image.open(mf.example(2)["mask"])), canvases[2].mask)


def test_tfds_masks_are_read_from_the_named_feature():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3):
        src = open_source("tfds:oxford_iiit_pet", "train", mask_key="segmentation_mask")
        ex = src.example(0)
        assert set(ex) == {"image", "mask"} and ex["mask"].shape[-1] == 1 and len(src) == 3
        assert src.num_classes is None and src.channels == 3
        with pytest.raises(DataError, match=r"no feature 'mask'; features: .*segmentation_mask.*data.mask_key"):
            open_source("tfds:oxford_iiit_pet", "train", mask_key="mask")
        # mock data draws the mask's size apart from the image's: the transform names the mismatch
        tf, _ = Segmentation(256, ignore_index=-1).transforms(train.DataConfig(), _model_cfg(256))
        shape = np.asarray(ex["image"]).shape[:2]
        if ex["mask"].shape[:2] != shape:
            with pytest.raises(DataError, match=r"the mask is \d+x\d+ but the image is \d+x\d+"):
                tf(ex, np.random.default_rng(0))


def _model_cfg(num_classes):
    from zoo.config import ModelCfg

    return ModelCfg(name="seg", family="test", input_size=(16, 16), num_classes=num_classes, interpolation="bilinear",
                    crop_pct=1.0, task="segmentation")
