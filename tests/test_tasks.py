"""Tasks plug into the unchanged loop: a second task kind, defined here, trains through `train.fit`.

The toy task ("spots") has examples with boxes + classes and a segmentation mask; its targets say which classes are
present. It checks the example transforms move every geometric target with the image (boxes and mask against the
same rectangles drawn into the image), and that its collation, loss, metrics and best metric are the ones the loop uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train
from train.data import DataError
from train.sources import ArraySource
from train.tasks import Task, TaskConfig, pad_ragged, register_task
from train.transforms import MASK_IGNORE, Transform, transforms_for
from test_train_support import ROOT, tiny_config, tiny_model

K = 3  # classes of the toy task


@dataclass
class SpotsConfig(TaskConfig):
    kind: str = "spots_test"
    max_boxes: int = 4


@register_task("spots_test", SpotsConfig)
class Spots(Task):
    """Which classes have a box in the image (multi-label), from boxes padded to `max_boxes`; the mask rides along
    and evaluation checks it names the same classes as the boxes."""

    target_keys = ("boxes", "classes", "mask")
    metric_names = ("loss",)
    best_metric, best_mode = "presence_error", "min"

    def __init__(self, num_classes: int, max_boxes: int = 4):
        self.num_classes, self.max_boxes = num_classes, max_boxes

    @classmethod
    def from_config(cls, cfg, *, num_classes):
        return cls(num_classes, cfg.max_boxes)

    def transforms(self, data, model_cfg):
        return transforms_for(data, model_cfg, required=self.target_keys, eval_resize="letterbox")

    def collate(self, examples, valid, rng):
        boxes, box_valid = pad_ragged([ex["boxes"] for ex in examples], self.max_boxes, 0.0, np.float32)
        classes, _ = pad_ragged([ex["classes"] for ex in examples], self.max_boxes, 0, np.int32)
        return {"image": np.stack([ex["image"] for ex in examples]), "boxes": boxes, "classes": classes,
                "box_valid": box_valid.astype(np.float32), "mask": np.stack([ex["mask"] for ex in examples]),
                "valid": valid.astype(np.float32)}

    def _presence(self, batch):
        onehot = jax.nn.one_hot(batch["classes"], self.num_classes) * batch["box_valid"][..., None]
        return onehot.max(axis=1)

    def loss(self, forward, batch, *, task_params, consts, rng):
        logits = forward(batch["image"])
        loss = optax.sigmoid_binary_cross_entropy(logits, self._presence(batch)).mean()
        return loss, {"loss": loss}

    def eval_sums(self, forward, batch):
        logits = forward(batch["image"]).astype(jnp.float32)
        target, valid = self._presence(batch), batch["valid"]
        in_mask = (batch["mask"][..., None] == jnp.arange(1, self.num_classes + 1)).any(axis=(1, 2))
        return {"count": valid.sum(),
                "loss": (optax.sigmoid_binary_cross_entropy(logits, target).mean(-1) * valid).sum(),
                "errors": (((logits > 0) != (target > 0)).mean(-1) * valid).sum(),
                "consistent": ((in_mask == (target > 0)).all(-1) * valid).sum()}

    def summarize(self, sums):
        n = max(float(sums["count"]), 1.0)
        return {"loss": float(sums["loss"]) / n, "presence_error": float(sums["errors"]) / n,
                "consistency": float(sums["consistent"]) / n}


def spots(n: int, size: int = 24, seed: int = 0):
    """Images with 1-3 non-overlapping filled rectangles (class c drawn with a class tint), their boxes, classes and
    mask (class + 1 inside a rectangle, 0 elsewhere)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(128, 10, (n, size, size, 3))
    masks = np.zeros((n, size, size), np.int32)
    tint = np.asarray([[230, 40, 40], [40, 230, 40], [40, 40, 230]])
    boxes, classes = [], []
    for i in range(n):
        b, c = [], []
        for slot in rng.permutation(4)[:rng.integers(1, 4)]:  # one rectangle per quadrant at most: no overlap
            y0, x0 = (slot // 2) * size // 2 + rng.integers(0, 4), (slot % 2) * size // 2 + rng.integers(0, 4)
            y1, x1 = y0 + rng.integers(5, 9), x0 + rng.integers(5, 9)
            k = int(rng.integers(0, K))
            images[i, y0:y1, x0:x1] = tint[k]
            masks[i, y0:y1, x0:x1] = k + 1
            b.append([x0, y0, x1, y1])
            c.append(k)
        boxes.append(np.asarray(b, np.float32))
        classes.append(np.asarray(c, np.int32))
    images = np.clip(images, 0, 255).astype(np.uint8)
    return ArraySource(images, targets={"boxes": boxes, "classes": classes, "mask": masks}, num_classes=K)


# ---- (a) geometric targets move with the image -------------------------------------------------------------------

def _drawing(rng, size=(30, 40), count=5):
    """A gray image of `count` non-overlapping rectangles valued 1..count on 0, with their boxes (x0, y0, x1, y1)."""
    h, w = size
    img = np.zeros(size, np.uint8)
    boxes = []
    cols = w // count
    for k in range(count):
        x0 = k * cols + int(rng.integers(0, 3))
        x1 = min(x0 + int(rng.integers(3, cols - 2)), (k + 1) * cols)
        y0 = int(rng.integers(0, h - 8))
        y1 = y0 + int(rng.integers(4, h - y0))
        img[y0:y1, x0:x1] = k + 1
        boxes.append([x0, y0, x1, y1])
    return img, np.asarray(boxes, np.float32)


def _check_consistent(out, count, region=None):
    """The rectangles found in the transformed drawing are the transformed boxes (within 1 px), and the mask is the
    transformed drawing. `region` (H, W): the image part inside the padding."""
    drawn = np.rint(out["image"][..., 0] * 255).astype(np.int64)
    mask = out["mask"]
    if region is not None:
        h, w = region
        assert np.all(mask[h:] == MASK_IGNORE) and np.all(mask[:, w:] == MASK_IGNORE)
        assert np.all(drawn[h:] == 0) and np.all(drawn[:, w:] == 0)
        drawn, mask = drawn[:h, :w], mask[:h, :w]
    np.testing.assert_array_equal(mask, drawn)
    kept = dict(zip(out["classes"].tolist(), out["boxes"]))
    assert len(kept) == len(out["boxes"])
    for k in range(count):
        ys, xs = np.nonzero(drawn == k + 1)
        if k not in kept:
            assert ys.size == 0, f"box {k} was dropped but its rectangle is in the image"
            continue
        box = kept[k]
        if ys.size == 0:  # a sliver thinner than a pixel may hold no pixel centre
            assert min(box[2] - box[0], box[3] - box[1]) < 1.0, (k, box)
            continue
        found = np.asarray([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
        np.testing.assert_allclose(box, found, atol=1.0, err_msg=f"rectangle {k}")


def test_crops_flips_and_letterbox_move_boxes_and_mask_with_the_image():
    tf = Transform(size=(24, 20), mean=(0.0,), std=(1.0,), channels=1, train=True, interpolation="nearest",
                   rrc_scale=(0.15, 1.0), hflip=True, required=("boxes", "classes", "mask"))
    flipped = dropped = 0
    for seed in range(40):
        img, boxes = _drawing(np.random.default_rng(seed))
        ex = {"image": img, "boxes": boxes, "classes": np.arange(len(boxes)), "mask": img.astype(np.int32)}
        out = tf(ex, np.random.default_rng([7, seed]))
        again = tf(ex, np.random.default_rng([7, seed]))
        for key in out:  # deterministic given the generator's seed
            np.testing.assert_array_equal(out[key], again[key])
        assert out["image"].shape == (24, 20, 1) and out["mask"].shape == (24, 20)
        _check_consistent(out, len(boxes))
        probe = tf(np.tile(np.arange(40, dtype=np.uint8), (30, 1)), np.random.default_rng([7, seed]))
        flipped += probe[0, 0, 0] > probe[0, -1, 0]  # the ramp decreases: this draw flipped
        dropped += len(out["boxes"]) < len(boxes)
    assert 5 < flipped < 35 and dropped > 0  # both branches were exercised
    # evaluation: letterbox keeps the aspect ratio (30x40 -> 18x24 in 24x24) and pads the mask with MASK_IGNORE
    ev = Transform(size=(24, 24), mean=(0.0,), std=(1.0,), channels=1, train=False, interpolation="nearest",
                   eval_resize="letterbox")
    img, boxes = _drawing(np.random.default_rng(99))
    out = ev({"image": img, "boxes": boxes, "classes": np.arange(5), "mask": img}, None)
    assert out["image"].shape == (24, 24, 1) and len(out["boxes"]) == 5
    _check_consistent(out, 5, region=(18, 24))


def test_a_missing_target_is_named_and_eval_matches_predict_preprocessing():
    tf = Transform(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3, channels=3, train=True,
                   required=("boxes", "classes", "mask"))
    image = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(DataError, match=r"example has no 'mask' \(it has boxes, classes, image\); this task needs "
                                        r"image, boxes, classes, mask"):
        tf({"image": image, "boxes": np.zeros((1, 4)), "classes": np.zeros(1)}, np.random.default_rng(0))
    with pytest.raises(DataError, match=r"mask has shape \(5, 5\), its image is 20x20"):
        tf({"image": image, "boxes": np.zeros((0, 4)), "classes": np.zeros(0), "mask": np.zeros((5, 5))}, None)
    with pytest.raises(DataError, match=r"examples have no 'boxes' \(they have image, label\); the spots_test task"):
        Spots(K).validate(ArraySource(np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, int)), tiny_model(K).cfg)
    # centre-crop evaluation of a bare image is exactly zoo's predict preprocessing
    from zoo.preprocess import preprocess

    model_cfg = tiny_model().cfg.replace(input_size=(32, 32), crop_pct=0.875, interpolation="bicubic")
    photo = np.random.default_rng(0).integers(0, 255, (45, 60, 3), dtype=np.uint8)
    _, ev = transforms_for(train.DataConfig(), model_cfg)
    np.testing.assert_allclose(ev(photo, None), preprocess(photo, model_cfg)[0], atol=1e-6)  # same pixels


# ---- (b) the toy task trains through the unchanged loop ----------------------------------------------------------

def test_a_second_task_trains_through_fit_and_picks_its_best_metric(tmp_path):
    cfg = tiny_config(tmp_path / "run", 6, eval_every=3, tensorboard=False)
    cfg = train.apply_overrides(cfg, ["task.kind=spots_test", "task.max_boxes=3", "data.hflip=true"])
    assert isinstance(cfg.task, SpotsConfig) and cfg.task.max_boxes == 3
    assert train.config.from_dict(train.config.to_dict(cfg)) == cfg
    result = train.fit(cfg, model=tiny_model(num_classes=K), train_data=spots(64), eval_data=spots(24, seed=1))
    trains = [r for r in result.history if r["split"] == "train"]
    assert len(trains) == 6 and all(np.isfinite(r["loss"]) for r in trains)
    evals = [r for r in result.history if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    assert set(result.metrics) == {"loss", "presence_error", "consistency"}
    assert result.metrics["consistency"] == 1.0  # boxes and mask name the same classes after the eval transform
    best = min(evals, key=lambda r: r["presence_error"])
    ckpt = train.Checkpoints(tmp_path / "run", read_only=True)
    try:
        recorded = ckpt.read_meta(which="best")["best"]
    finally:
        ckpt.close()
    assert recorded["metric"] == "presence_error" and recorded["step"] == best["step"], recorded
    # a batch that overflows the task's static box count is a clear error
    with pytest.raises(DataError, match="more than the 1 a batch holds"):
        Spots(K, max_boxes=1).collate([{"image": np.zeros((2, 2, 3)), "boxes": np.zeros((2, 4)),
                                        "classes": np.zeros(2), "mask": np.zeros((2, 2))}], np.ones(1, bool), None)


def test_the_loop_step_and_loader_never_name_a_task():
    for name in ("loop.py", "step.py", "data.py"):
        text = (ROOT / "train" / name).read_text()
        assert not re.search(r"Classification|label", text), name


def test_the_task_adapts_a_loaded_model_and_unknown_kinds_are_named():
    base = tiny_model(num_classes=10)
    small = tiny_model(num_classes=4, seed=1)
    variables = train.Classification(4).adapt(small.module, base, small.cfg)
    assert variables["params"]["head"]["kernel"].shape == (16, 4) and not np.any(variables["params"]["head"]["kernel"])
    np.testing.assert_array_equal(variables["params"]["stem"]["kernel"], base.variables["params"]["stem"]["kernel"])
    with pytest.raises(ValueError, match=r"do not fit.*head/kernel \(16, 10\) vs \(16, 4\)"):
        Spots(4).adapt(small.module, base, small.cfg)  # a task without a classifier to reset
    with pytest.raises(train.ConfigError, match="task.kind: unknown task kind 'detector'; registered kinds: "
                                                "classification"):
        train.apply_overrides(train.TrainConfig(), ["task.kind=detector"])
    with pytest.raises(train.ConfigError, match=r"unknown config key 'task.max_boxes'.*task.kind=classification"):
        train.apply_overrides(train.TrainConfig(), ["task.max_boxes=3"])


def test_distillation_hands_the_wrapped_tasks_pipeline_through():
    """The distillation wrapper trains the wrapped task: its kind, targets, transforms, collation, adaptation and
    host-side evaluation."""
    import zoo
    from train.distill import Distillation
    from train.tasks import Classification

    class Marked(Classification):
        def transforms(self, data, model_cfg):
            return ("train-tf", "eval-tf")

        def adapt(self, module, base, model_cfg):
            return {"adapted": True}

        def host_evaluator(self):
            return "host-evaluator"

    inner = Marked(3)
    from reference import random_variables
    from zoo.registry import get_entry

    module = zoo.create_model("mobilenetv3_small_050", num_classes=3)  # random variables: no init compile
    cfg = get_entry("mobilenetv3_small_050").cfg.replace(num_classes=3)
    teacher = zoo.Model(module, random_variables(module, (1, 32, 32, 3)), cfg)
    task = Distillation(inner, teacher, teacher.cfg)
    assert task.kind == inner.kind and task.target_keys == inner.target_keys
    assert task.transforms(None, teacher.cfg) == ("train-tf", "eval-tf")
    assert task.adapt(None, None, teacher.cfg) == {"adapted": True}
    assert task.host_evaluator() == "host-evaluator"  # a detector's mAP is computed on the host
    examples = [{"image": np.zeros((4, 4, 3), np.float32), "label": i} for i in range(2)]
    batch = task.collate(examples, np.ones(2, bool), None)
    np.testing.assert_array_equal(batch["label"], [0, 1])
