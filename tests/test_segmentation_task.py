"""The segmentation task: its loss and confusion-matrix metrics against numpy references (ignore index, padded
examples), adaptation of a loaded model's classifiers, the config kind, and training through the unchanged loop: a
tiny model (aux loss, best mIoU checkpoint) and LR-ASPP on the digit canvases, whose mIoU training raises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from train.tasks import Segmentation, SegmentationConfig
from train.tasks.segmentation import confusion_matrix, segmentation_metrics

IGNORE = 255


class _Fixed:
    """A stand-in for `Forward`: returns the given outputs whatever the input."""

    def __init__(self, out):
        self.out = out

    def __call__(self, x):
        return self.out


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_loss(logits, mask, smoothing=0.0):
    """torch's cross_entropy(ignore_index=255, label_smoothing=...) averaged over the counted pixels, in numpy."""
    logp = _log_softmax(logits.astype(np.float64))
    keep = mask != IGNORE
    nll = -np.take_along_axis(logp, np.where(keep, mask, 0)[..., None], -1)[..., 0]
    per_pixel = (1 - smoothing) * nll - smoothing * logp.mean(-1)
    return per_pixel[keep].mean()


def _batch(rng, b=3, h=5, w=6, k=4):
    mask = rng.integers(0, k, (b, h, w))
    mask[rng.random((b, h, w)) < 0.2] = IGNORE
    return {"image": np.zeros((b, h, w, 3), np.float32), "mask": mask.astype(np.int32),
            "valid": np.ones(b, np.float32)}, rng.normal(0, 2, (b, h, w, k)).astype(np.float32)


def test_loss_ignores_255_and_matches_numpy():
    rng = np.random.default_rng(0)
    batch, logits = _batch(rng)
    aux = rng.normal(0, 2, logits.shape).astype(np.float32)
    loss_fn = jax.jit(lambda task, out, b: task.loss(_Fixed(out), b, task_params={}, consts={}, rng=None),
                      static_argnums=0)
    loss, metrics = loss_fn(Segmentation(4), {"out": logits}, batch)
    assert float(loss) == pytest.approx(_np_loss(logits, batch["mask"]), rel=1e-5)
    changed = np.where((batch["mask"] == IGNORE)[..., None], 100.0, logits)  # ignored pixels add nothing
    assert float(loss_fn(Segmentation(4), {"out": changed}, batch)[0]) == pytest.approx(float(loss), rel=1e-6)
    keep = batch["mask"] != IGNORE
    assert float(metrics["pixel_accuracy"]) == pytest.approx((logits.argmax(-1) == batch["mask"])[keep].mean())
    # the auxiliary head's loss, weighted (torchvision's 0.5), and label smoothing
    loss, metrics = loss_fn(Segmentation(4), {"out": logits, "aux": aux}, batch)
    expected = _np_loss(logits, batch["mask"]) + 0.5 * _np_loss(aux, batch["mask"])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["aux_loss"]) == pytest.approx(_np_loss(aux, batch["mask"]), rel=1e-5)
    smooth = Segmentation(4, label_smoothing=0.1, aux_weight=0.0)
    assert float(loss_fn(smooth, {"out": logits, "aux": aux}, batch)[0]) == pytest.approx(
        _np_loss(logits, batch["mask"], 0.1), rel=1e-5)
    with pytest.raises(ValueError, match="ignore_index 3 is a class id"):
        Segmentation(4, ignore_index=3)


def test_confusion_matrix_miou_matches_numpy_with_ignore_and_padding():
    rng = np.random.default_rng(1)
    task, k = Segmentation(5), 5
    eval_sums = jax.jit(lambda out, b: task.eval_sums(_Fixed(out), b))
    targets, preds, total = [], [], None
    for step in range(3):
        batch, logits = _batch(rng, k=k)
        logits[..., 4] -= 50.0  # class 4 is never predicted ...
        batch["mask"][batch["mask"] == 4] = 3  # ... nor a target: it has no IoU and stays out of the mean
        if step == 2:  # the last batch is padded: its third example is a repeat that must count nothing
            batch["valid"][2] = 0.0
            logits[2] = rng.normal(0, 2, logits[2].shape)
        sums = jax.device_get(eval_sums({"out": logits}, batch))
        total = sums if total is None else jax.tree.map(np.add, total, sums)
        n = int(batch["valid"].sum())
        targets.append(batch["mask"][:n].ravel())
        preds.append(logits[:n].argmax(-1).ravel())
    t, p = np.concatenate(targets), np.concatenate(preds)
    keep = t != IGNORE
    t, p = t[keep], p[keep]
    ref = np.zeros((k, k), np.int64)
    np.add.at(ref, (t, p), 1)
    np.testing.assert_array_equal(total["confusion"], ref)
    metrics = task.summarize(total)
    ious = {c: np.sum((t == c) & (p == c)) / np.sum((t == c) | (p == c)) for c in range(4)}
    assert metrics["miou"] == pytest.approx(np.mean(list(ious.values())))
    assert metrics["pixel_accuracy"] == pytest.approx(np.mean(t == p))
    assert {f"iou_{c}": pytest.approx(v) for c, v in ious.items()} == {m: v for m, v in metrics.items()
                                                                       if m.startswith("iou_")}
    assert "iou_4" not in metrics
    # the per-pixel form, directly: rows are targets, columns predictions
    cm = confusion_matrix(jnp.asarray([[0, 1, 1]]), jnp.asarray([[1, 1, 0]]), 2, jnp.asarray([[True, True, False]]))
    np.testing.assert_array_equal(cm, [[0, 1], [0, 1]])
    assert segmentation_metrics(np.asarray([[3, 1], [0, 0]]))["miou"] == pytest.approx((3 / 4 + 0) / 2)


def _tiny_segmenter(num_classes: int, size: int = 16, seed: int = 0):
    """A zoo.Model of a two-layer fully convolutional network with BatchNorm, an `out` and an `aux` classifier,
    logits upsampled to the input as the zoo's segmentation models return them."""
    import flax.linen as nn

    import zoo
    from export.weights import random_variables
    from zoo.config import ModelCfg

    class Head(nn.Module):
        num_classes: int

        @nn.compact
        def __call__(self, x):
            return nn.Conv(self.num_classes, (1, 1), name="classifier")(x)

    class TinySeg(nn.Module):
        num_classes: int

        @nn.compact
        def __call__(self, x, train: bool = False):
            y = nn.Conv(16, (3, 3), strides=2, use_bias=False, name="stem")(x)
            y = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(y))
            up = lambda z: jax.image.resize(z, (*x.shape[:3], z.shape[-1]), "bilinear")  # noqa: E731
            return {"out": up(Head(self.num_classes, name="out")(y)),
                    "aux": up(Head(self.num_classes, name="aux")(y))}

    module = TinySeg(num_classes)
    cfg = ModelCfg(name="tiny_seg", family="test", input_size=(size, size), num_classes=num_classes,
                   mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0, interpolation="bilinear",
                   classifier=("out/classifier", "aux/classifier"), task="segmentation")
    return zoo.Model(module, jax.device_put(random_variables(module, (1, size, size, 3), seed=seed)), cfg)


def _blobs(n: int, size: int = 20, seed: int = 0):
    """Images of two tinted squares on gray, masks naming the tint's class (1 or 2), 0 elsewhere."""
    rng = np.random.default_rng(seed)
    images = rng.normal(128, 10, (n, size, size, 3))
    masks = np.zeros((n, size, size), np.uint8)
    tint = np.asarray([[230, 40, 40], [40, 40, 230]])
    for i in range(n):
        for k, (y, x) in enumerate(rng.integers(0, size - 8, (2, 2))):
            images[i, y:y + 8, x:x + 8] = tint[k]
            masks[i, y:y + 8, x:x + 8] = k + 1
    return np.clip(images, 0, 255).astype(np.uint8), masks


def test_adapt_resets_every_classifier_and_the_model_must_segment():
    base, small = _tiny_segmenter(5), _tiny_segmenter(3, seed=1)
    variables = Segmentation(3).adapt(small.module, base, small.cfg)
    for head in ("out", "aux"):
        kernel = variables["params"][head]["classifier"]["kernel"]
        assert kernel.shape == (1, 1, 16, 3) and not np.any(kernel)
    np.testing.assert_array_equal(variables["params"]["stem"]["kernel"], base.variables["params"]["stem"]["kernel"])
    assert Segmentation(5).adapt(base.module, base, base.cfg) is base.variables
    images, masks = _blobs(4)
    with pytest.raises(ValueError, match=r"tiny is a classification model; the segmentation task trains models"):
        from test_train_support import tiny_model

        Segmentation(10).validate(train.ArraySource(images, targets={"mask": masks}), tiny_model().cfg)
    with pytest.raises(train.DataError, match=r"examples have no 'mask' \(they have image, label\)"):
        Segmentation(3).validate(train.ArraySource(images, np.zeros(4, int)), small.cfg)


def test_a_segmenter_trains_through_fit_and_keeps_the_best_miou(tmp_path):
    from test_train_support import tiny_config

    images, masks = _blobs(96)
    cfg = tiny_config(tmp_path / "run", 8, eval_every=4, tensorboard=False)
    cfg = train.apply_overrides(cfg, ["task.kind=segmentation", "task.scale_range=0.8,1.25", "optim.lr=0.03",
                                      "data.hflip=true", "model.num_classes=3"])
    assert isinstance(cfg.task, SegmentationConfig) and cfg.task.scale_range == (0.8, 1.25)
    assert train.config.from_dict(train.config.to_dict(cfg)) == cfg
    result = train.fit(cfg, model=_tiny_segmenter(3), train_data=(images[:64], masks[:64]),
                       eval_data=(images[64:], masks[64:]))
    trains = [r for r in result.history if r["split"] == "train"]
    assert all(np.isfinite(r["loss"]) and r["aux_loss"] > 0 for r in trains)
    evals = [r for r in result.history if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8] and {"miou", "pixel_accuracy", "iou_0"} <= set(result.metrics)
    ckpt = train.Checkpoints(tmp_path / "run", read_only=True)
    try:
        recorded = ckpt.read_meta(which="best")["best"]
    finally:
        ckpt.close()
    assert recorded["metric"] == "miou" and recorded["value"] == max(r["miou"] for r in evals)
    assert result.metrics["miou"] > 0.3  # three classes from the tint: chance is far lower
    # evaluating a segmenter without naming a task takes the model's own (mIoU, not top-1)
    again = train.evaluate(result.model, (images[64:], masks[64:]), batch_size=16)
    assert {"miou", "pixel_accuracy"} <= set(again) and "accuracy" not in again

    # ... and on a tfds dataset whose masks are a named feature (tfds's mock serving these records): the same
    # images and masks give the same numbers
    tfds = pytest.importorskip("tensorflow_datasets")
    records = [{"image": im, "segmentation_mask": m[..., None], "label": 0, "species": 0, "file_name": "x"}
               for im, m in zip(images[64:], masks[64:])]
    with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: records):
        served = train.evaluate(result.model, "tfds:oxford_iiit_pet", split="test", batch_size=16,
                                source_options={"mask_key": "segmentation_mask"})
        with pytest.raises(train.DataError, match=r"no feature 'mask'; features: .*segmentation_mask"):
            train.evaluate(result.model, "tfds:oxford_iiit_pet", split="test", source_options={"mask_key": "mask"})
    assert served["miou"] == pytest.approx(again["miou"], abs=1e-6)


def test_zoo_eval_reads_tfds_features_from_its_flags_else_the_run():
    import argparse

    from train.cli import _source_keys

    flags = argparse.Namespace(data_dir=None, image_key=None, label_key=None, mask_key="segmentation_mask")
    run = train.DataConfig(image_key="photo", mask_key="trimap", data_dir="/data")
    assert _source_keys(flags, run) == {"data_dir": "/data", "image_key": "photo", "label_key": "label",
                                        "mask_key": "segmentation_mask"}
    assert _source_keys(flags, None) == {"data_dir": None, "image_key": "image", "label_key": "label",
                                         "mask_key": "segmentation_mask"}


def test_lraspp_learns_the_digit_canvases(tmp_path, mnist5k):
    """LR-ASPP from random weights on 64x64 digit canvases read from the VOC layout: ten steps raise its mIoU.

    For CI time, the stride-2 to stride-8 stages stay frozen (the step differentiates the dilated stages 5-6 and the
    head: 13 s of compiling instead of 29 s) and XLA compiles without most optimizations (`quick_compile`); the
    recipe `digit_canvases_lraspp` trains every layer.
    """
    import zoo
    from export.weights import random_variables
    from quick_compile import quick_compile
    from train.datasets.digit_canvases import write_digit_canvases
    from zoo.layers.conv import depthwise_impl
    from zoo.registry import get_entry

    (xtr, ytr), (xte, yte) = mnist5k
    root = write_digit_canvases(tmp_path / "canvases", train=96, val=32, size=64,
                                digits=((xtr[:500], ytr[:500]), (xte[:200], yte[:200])))
    name = "lraspp_mobilenet_v3_large"
    module = zoo.create_model(name, num_classes=11)
    model = zoo.Model(module, jax.device_put(random_variables(module, (1, 64, 64, 3))),
                      get_entry(name).cfg.replace(num_classes=11))  # numpy init: no init to compile
    cfg = train.TrainConfig(workdir=str(tmp_path / "run"), steps=10, progress=False, plot=False, tensorboard=False)
    cfg = train.apply_overrides(cfg, [f"data.source=folder:{root}", "data.eval_split=val", "data.image_size=64",
                                      "data.batch_size=16", "data.hflip=false", "data.workers=1",
                                      "task.kind=segmentation", "task.scale_range=0.75,1.25", "optim.lr=3e-3",
                                      "optim.weight_decay=1e-4", "optim.freeze=^(stem|stages_[0-4])/",
                                      "async_checkpoints=false"])
    with quick_compile():
        trainer = train.Trainer(cfg, model=model)
        assert trainer.train_src.num_classes == 11  # from the canvases' labels.txt
        with depthwise_impl(cfg.depthwise_impl):  # as the run evaluates: one compiled evaluation
            before = trainer.evaluate()
        after = trainer.run().metrics
    assert after["miou"] > before["miou"] + 0.03 and after["pixel_accuracy"] > 0.8, (before, after)
    assert after["loss"] < before["loss"] / 4, (before, after)
