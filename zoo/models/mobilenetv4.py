"""MobileNetV4, convolutional variants (Qin et al., "MobileNetV4: Universal Models for the Mobile Ecosystem",
arXiv:2404.10518), as timm builds them.

Stage tables are the appendix tables of MNv4-Conv-S, MNv4-Conv-M and MNv4-Conv-L. Most blocks are universal inverted
bottlenecks ('uir' rows): `start_kernel` is the depthwise conv before the expansion, `kernel` the one after it (0:
none), which makes a row an ExtraDW (both), inverted residual (middle only), ConvNeXt-like (start only) or FFN
(neither) block. The head pools first, then a 1x1 conv without bias, BatchNorm and act to 1280 features.
"""

from __future__ import annotations

from functools import partial

from zoo.config import INCEPTION_MEAN, INCEPTION_STD, ModelCfg
from zoo.models.mobilenet_base import BlockSpec, MobileNet, feature_info, make_divisible, resolve_stages, stage
from zoo.models._mobile_convert import timm_rename as _mobile_timm_rename
from zoo.models._pretrained import timm_weights
from zoo.registry import register_model

UIR = partial(BlockSpec, kind="uir", repeat=1)
CN = partial(BlockSpec, kind="cn", repeat=1)
HEAD = stage(kind="cn", repeat=1, kernel=1, stride=1, out=960)  # the last stage of every variant, 7x7 in at 224

# MNv4-Conv-S table, 224x224 input.
SMALL = (
    stage(CN(kernel=3, stride=2, out=32), CN(kernel=1, stride=1, out=32)),  # stage 0, 112x112 in
    stage(CN(kernel=3, stride=2, out=96), CN(kernel=1, stride=1, out=64)),  # stage 1, 56x56 in
    stage(UIR(start_kernel=5, kernel=5, stride=2, expand=3, out=96),  # stage 2, 28x28 in: ExtraDW
          UIR(start_kernel=0, kernel=3, stride=1, expand=2, out=96, repeat=4),  # IR
          UIR(start_kernel=3, kernel=0, stride=1, expand=4, out=96)),  # ConvNeXt
    stage(UIR(start_kernel=3, kernel=3, stride=2, expand=6, out=128),  # stage 3, 14x14 in: ExtraDW
          UIR(start_kernel=5, kernel=5, stride=1, expand=4, out=128),  # ExtraDW
          UIR(start_kernel=0, kernel=5, stride=1, expand=4, out=128),  # IR
          UIR(start_kernel=0, kernel=5, stride=1, expand=3, out=128),  # IR
          UIR(start_kernel=0, kernel=3, stride=1, expand=4, out=128, repeat=2)),  # IR
    HEAD,
)

# MNv4-Conv-M table, 256x256 input in the paper (224 in timm's comments: the layout is the same).
ER = partial(BlockSpec, kind="er", repeat=1)
MEDIUM = (
    stage(ER(kernel=3, stride=2, expand=4, out=48)),  # stage 0, 112x112 in: FusedIB
    stage(UIR(start_kernel=3, kernel=5, stride=2, expand=4, out=80),  # stage 1, 56x56 in: ExtraDW
          UIR(start_kernel=3, kernel=3, stride=1, expand=2, out=80)),  # ExtraDW
    stage(UIR(start_kernel=3, kernel=5, stride=2, expand=6, out=160),  # stage 2, 28x28 in: ExtraDW
          UIR(start_kernel=3, kernel=3, stride=1, expand=4, out=160, repeat=2),  # ExtraDW
          UIR(start_kernel=3, kernel=5, stride=1, expand=4, out=160),  # ExtraDW
          UIR(start_kernel=3, kernel=3, stride=1, expand=4, out=160),  # ExtraDW
          UIR(start_kernel=3, kernel=0, stride=1, expand=4, out=160),  # ConvNeXt
          UIR(start_kernel=0, kernel=0, stride=1, expand=2, out=160),  # FFN
          UIR(start_kernel=3, kernel=0, stride=1, expand=4, out=160)),  # ConvNeXt
    stage(UIR(start_kernel=5, kernel=5, stride=2, expand=6, out=256),  # stage 3, 14x14 in: ExtraDW
          UIR(start_kernel=5, kernel=5, stride=1, expand=4, out=256),  # ExtraDW
          UIR(start_kernel=3, kernel=5, stride=1, expand=4, out=256, repeat=2),  # ExtraDW
          UIR(start_kernel=0, kernel=0, stride=1, expand=4, out=256),  # FFN
          UIR(start_kernel=3, kernel=0, stride=1, expand=4, out=256),  # ConvNeXt
          UIR(start_kernel=3, kernel=5, stride=1, expand=2, out=256),  # ExtraDW
          UIR(start_kernel=5, kernel=5, stride=1, expand=4, out=256),  # ExtraDW
          UIR(start_kernel=0, kernel=0, stride=1, expand=4, out=256, repeat=2),  # FFN
          UIR(start_kernel=5, kernel=0, stride=1, expand=2, out=256)),  # ConvNeXt
    HEAD,
)

# MNv4-Conv-L table, 384x384 input in the paper.
LARGE = (
    stage(ER(kernel=3, stride=2, expand=4, out=48)),  # stage 0: FusedIB
    stage(UIR(start_kernel=3, kernel=5, stride=2, expand=4, out=96),  # stage 1: ExtraDW
          UIR(start_kernel=3, kernel=3, stride=1, expand=4, out=96)),  # ExtraDW
    stage(UIR(start_kernel=3, kernel=5, stride=2, expand=4, out=192),  # stage 2: ExtraDW
          UIR(start_kernel=3, kernel=3, stride=1, expand=4, out=192, repeat=3),  # ExtraDW
          UIR(start_kernel=3, kernel=5, stride=1, expand=4, out=192),  # ExtraDW
          UIR(start_kernel=5, kernel=3, stride=1, expand=4, out=192, repeat=5),  # ExtraDW
          UIR(start_kernel=3, kernel=0, stride=1, expand=4, out=192)),  # ConvNeXt
    stage(UIR(start_kernel=5, kernel=5, stride=2, expand=4, out=512, repeat=4),  # stage 3: ExtraDW
          UIR(start_kernel=5, kernel=0, stride=1, expand=4, out=512),  # ConvNeXt
          UIR(start_kernel=5, kernel=3, stride=1, expand=4, out=512),  # ExtraDW
          UIR(start_kernel=5, kernel=0, stride=1, expand=4, out=512, repeat=2),  # ConvNeXt
          UIR(start_kernel=5, kernel=3, stride=1, expand=4, out=512),  # ExtraDW
          UIR(start_kernel=5, kernel=5, stride=1, expand=4, out=512),  # ExtraDW
          UIR(start_kernel=5, kernel=0, stride=1, expand=4, out=512, repeat=3)),  # ConvNeXt
    HEAD,
)

# name: (table, width, stem width, act, anti-aliasing pool, pretrained weights); a model's default input size is that
# of timm's default (first) tag. The anti-aliased variants (timm's experimental "aa" and "blur" models, not in the
# paper) downsample by a stride-1 conv and a 2x2 average or 3x3 blur pool in every strided block. Top-1/5 as timm
# evaluates each tag at its own input size and crop (pytorch-image-models, results/results-imagenet.csv).
_BICUBIC = dict(interpolation="bicubic")
_R256 = dict(input_size=(256, 256), crop_pct=0.95)
_R384 = dict(input_size=(384, 384), crop_pct=0.95)
VARIANTS = {
    "mobilenetv4_conv_small": (SMALL, 1.0, 32, "relu", None, (
        timm_weights("mobilenetv4_conv_small", "e2400_r224_in1k", top1=73.756, top5=91.43, **_BICUBIC),
        timm_weights("mobilenetv4_conv_small", "e1200_r224_in1k", top1=73.45, top5=91.34, **_BICUBIC),
        timm_weights("mobilenetv4_conv_small", "e3600_r256_in1k",
                     top1=74.534, top5=91.94, mean=INCEPTION_MEAN, std=INCEPTION_STD, **_R256, **_BICUBIC),
    )),
    "mobilenetv4_conv_small_050": (SMALL, 0.5, 32, "relu", None, (
        timm_weights("mobilenetv4_conv_small_050", "e3000_r224_in1k",
                     top1=64.778, top5=85.5, mean=INCEPTION_MEAN, std=INCEPTION_STD, **_BICUBIC),
    )),
    "mobilenetv4_conv_medium": (MEDIUM, 1.0, 32, "relu", None, (
        timm_weights("mobilenetv4_conv_medium", "e500_r256_in1k", top1=79.916, top5=95.188, **_R256, **_BICUBIC),
        timm_weights("mobilenetv4_conv_medium", "e500_r224_in1k",
                     top1=79.092, top5=94.788, input_size=(224, 224), crop_pct=0.95, **_BICUBIC),
        timm_weights("mobilenetv4_conv_medium", "e250_r384_in12k_ft_in1k",
                     top1=82.776, top5=96.448, **_R384, **_BICUBIC),
    )),
    "mobilenetv4_conv_large": (LARGE, 1.0, 24, "relu", None, (
        timm_weights("mobilenetv4_conv_large", "e600_r384_in1k", top1=82.974, top5=96.244, **_R384, **_BICUBIC),
        timm_weights("mobilenetv4_conv_large", "e500_r256_in1k", top1=81.864, top5=95.696, **_R256, **_BICUBIC),
    )),
    "mobilenetv4_conv_blur_medium": (MEDIUM, 1.0, 32, "relu", "blur", (
        timm_weights("mobilenetv4_conv_blur_medium", "e500_r224_in1k",
                     top1=79.446, top5=94.92, crop_pct=0.95, **_BICUBIC),
    )),
    "mobilenetv4_conv_aa_large": (LARGE, 1.0, 24, "relu", "avg", (
        timm_weights("mobilenetv4_conv_aa_large", "e230_r448_in12k_ft_in1k",
                     top1=84.668, top5=97.108, input_size=(448, 448), crop_pct=0.95, **_BICUBIC),
        timm_weights("mobilenetv4_conv_aa_large", "e230_r384_in12k_ft_in1k",
                     top1=84.314, top5=97.102, **_R384, **_BICUBIC),
        timm_weights("mobilenetv4_conv_aa_large", "e600_r384_in1k", top1=83.264, top5=96.39, **_R384, **_BICUBIC),
    )),
}


def timm_rename(module: MobileNet):
    """timm's MobileNetV4 checkpoints: MobileNetV3's layout, the head's BatchNorm named `norm_head`."""
    rename = _mobile_timm_rename(module)
    return lambda path: "head/bn" if path == "norm_head" else rename(path)


def _build(table, width: float, stem: int, act: str, aa: str | None, **overrides) -> MobileNet:
    stem = stem if width < 1.0 else make_divisible(stem * width)  # timm keeps the stem fixed below width 1
    stages = resolve_stages(table, stem_chs=stem, act=act, width=width)
    kwargs = dict(stages=stages, stem_chs=stem, num_features=1280, head_type="mobilenetv3", act=act,
                  head_bias=False, head_norm=True, aa=aa)
    return MobileNet(**{**kwargs, **overrides})


for _name, (_table, _width, _stem, _act, _aa, _weights) in VARIANTS.items():
    _fn = partial(_build, _table, _width, _stem, _act, _aa)
    register_model(
        ModelCfg(name=_name, family="mobilenetv4", feature_info=feature_info(_fn().stages),
                 paper="arXiv:2404.10518 appendix tables (MNv4-Conv-S/M/L)", twin=f"timm:{_name}",
                 interpolation="bicubic", input_size=_weights[0].input_size or (224, 224)),
        _weights,
        converters={"timm": timm_rename},
    )(_fn)
