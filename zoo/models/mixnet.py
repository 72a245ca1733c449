"""MixNet (Tan & Le, "MixConv: Mixed Depthwise Convolutional Kernels", arXiv:1907.09595).

Inverted residuals whose depthwise conv mixes kernel sizes over channel groups (`kernel=(3, 5, 7)`: MDConv) and whose
1x1 convs may be split into channel groups (`exp_splits`, `pwl_splits`: the paper's grouped pointwise convs), see
`zoo.layers.mixed_conv`. Early stages use ReLU, later ones swish with squeeze-excite. Tables are the searched
MixNet-S and -M of the paper's Figure 8; -L is -M at width 1.3, -XL (timm's, not in the paper) -M at width 1.6 and
depth 1.2. `tf_` variants use TF "SAME" padding and BN eps 1e-3 (weights ported from TensorFlow).
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from zoo.config import ModelCfg
from zoo.layers import kinds
from zoo.layers.norm import BN_EPS_TF, BN_EPS_TORCH
from zoo.models.mobilenet_base import BlockSpec, MobileNet, feature_info, make_divisible, resolve_stages, stage
from zoo.models._mobile_convert import timm_rename
from zoo.models._pretrained import REL, timm_weights
from zoo.registry import register_model

IR = partial(BlockSpec, kind="ir", repeat=1)
SW = partial(IR, act="silu")  # the swish rows, all with squeeze-excite

# Paper Figure 8 (MixNet-S), 224x224 input.
SMALL = (
    stage(kind="ds", repeat=1, kernel=3, stride=1, out=16),  # stage 0, 112x112 in
    stage(IR(kernel=3, exp_splits=2, pwl_splits=2, stride=2, expand=6, out=24),  # stage 1, 112x112 in
          IR(kernel=3, exp_splits=2, pwl_splits=2, stride=1, expand=3, out=24)),
    stage(SW(kernel=(3, 5, 7), stride=2, expand=6, out=40, se=0.5),  # stage 2, 56x56 in
          SW(kernel=(3, 5), exp_splits=2, pwl_splits=2, stride=1, expand=6, out=40, se=0.5, repeat=3)),
    stage(SW(kernel=(3, 5, 7), pwl_splits=2, stride=2, expand=6, out=80, se=0.25),  # stage 3, 28x28 in
          SW(kernel=(3, 5), pwl_splits=2, stride=1, expand=6, out=80, se=0.25, repeat=2)),
    stage(SW(kernel=(3, 5, 7), exp_splits=2, pwl_splits=2, stride=1, expand=6, out=120, se=0.5),  # 14x14 in
          SW(kernel=(3, 5, 7, 9), exp_splits=2, pwl_splits=2, stride=1, expand=3, out=120, se=0.5, repeat=2)),
    stage(SW(kernel=(3, 5, 7, 9, 11), stride=2, expand=6, out=200, se=0.5),  # stage 5, 14x14 in
          SW(kernel=(3, 5, 7, 9), pwl_splits=2, stride=1, expand=6, out=200, se=0.5, repeat=2)),
)
# Paper Figure 8 (MixNet-M), 224x224 input.
MEDIUM = (
    stage(kind="ds", repeat=1, kernel=3, stride=1, out=24),  # stage 0, 112x112 in
    stage(IR(kernel=(3, 5, 7), exp_splits=2, pwl_splits=2, stride=2, expand=6, out=32),  # stage 1, 112x112 in
          IR(kernel=3, exp_splits=2, pwl_splits=2, stride=1, expand=3, out=32)),
    stage(SW(kernel=(3, 5, 7, 9), stride=2, expand=6, out=40, se=0.5),  # stage 2, 56x56 in
          SW(kernel=(3, 5), exp_splits=2, pwl_splits=2, stride=1, expand=6, out=40, se=0.5, repeat=3)),
    stage(SW(kernel=(3, 5, 7), stride=2, expand=6, out=80, se=0.25),  # stage 3, 28x28 in
          SW(kernel=(3, 5, 7, 9), exp_splits=2, pwl_splits=2, stride=1, expand=6, out=80, se=0.25, repeat=3)),
    stage(SW(kernel=3, stride=1, expand=6, out=120, se=0.5),  # stage 4, 14x14 in
          SW(kernel=(3, 5, 7, 9), exp_splits=2, pwl_splits=2, stride=1, expand=3, out=120, se=0.5, repeat=3)),
    stage(SW(kernel=(3, 5, 7, 9), stride=2, expand=6, out=200, se=0.5),  # stage 5, 14x14 in
          SW(kernel=(3, 5, 7, 9), pwl_splits=2, stride=1, expand=6, out=200, se=0.5, repeat=3)),
)

# name: (table, stem, width, depth, tf_port, pretrained weights); top-1/5 as timm evaluates the weights.
VARIANTS = {
    "mixnet_s": (SMALL, 16, 1.0, 1.0, False, (
        timm_weights("mixnet_s", "ft_in1k", REL + "mixnet_s-a907afbc.pth", top1=76.0, top5=92.796),)),
    "mixnet_m": (MEDIUM, 24, 1.0, 1.0, False, (
        timm_weights("mixnet_m", "ft_in1k", REL + "mixnet_m-4647fc68.pth", top1=77.268, top5=93.418),)),
    "mixnet_l": (MEDIUM, 24, 1.3, 1.0, False, (
        timm_weights("mixnet_l", "ft_in1k", REL + "mixnet_l-5a9a2ed8.pth", top1=78.97, top5=94.18),)),
    "mixnet_xl": (MEDIUM, 24, 1.6, 1.2, False, (
        timm_weights("mixnet_xl", "ra_in1k", REL + "mixnet_xl_ra-aac3c00c.pth", top1=80.494, top5=94.938),)),
    "tf_mixnet_s": (SMALL, 16, 1.0, 1.0, True, (
        timm_weights("tf_mixnet_s", "in1k", REL + "tf_mixnet_s-89d3354b.pth", top1=75.656, top5=92.632),)),
    "tf_mixnet_m": (MEDIUM, 24, 1.0, 1.0, True, (
        timm_weights("tf_mixnet_m", "in1k", REL + "tf_mixnet_m-0f4d8805.pth", top1=76.952, top5=93.164),)),
    "tf_mixnet_l": (MEDIUM, 24, 1.3, 1.0, True, (
        timm_weights("tf_mixnet_l", "in1k", REL + "tf_mixnet_l-6c92e0c8.pth", top1=78.774, top5=94.0),)),
}


class MixNet(MobileNet):
    """`MobileNet` with its own deploy form: a BatchNorm after a mixed conv reads the concatenation of several
    convs' outputs, which `compress.fold_bn` (one weight layer per norm) does not fold, so MixNet folds every
    BatchNorm itself (`fold_batchnorms`) into `deploy=True`: convs with a bias, no norms."""


def _conv_norm_pairs(module: nn.Module, variables: dict) -> list[tuple[str, str, float, str]]:
    """(conv path, BatchNorm path, eps, role) of every BatchNorm applied to a weight layer's or mixed conv's output,
    found by tracing `module` abstractly."""
    outputs, pairs = [], []

    def record(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        if ctx.method_name == "__call__":
            kind = kinds.kind_of(ctx.module)
            if kind is not None and kind.role in ("weight", "group"):
                outputs.append((out, "/".join(ctx.module.path), kind.role))
            elif kinds.is_folding_norm(ctx.module):
                x = args[0] if args else kwargs["x"]
                conv = next(((path, role) for y, path, role in reversed(outputs) if y is x), None)
                if conv is None:
                    raise ValueError(f"{'/'.join(ctx.module.path)}: a BatchNorm that follows no conv does not fold")
                pairs.append((conv[0], "/".join(ctx.module.path), float(ctx.module.epsilon), conv[1]))
        return out

    x = jax.ShapeDtypeStruct((1, 64, 64, module.in_chans), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x)
    return pairs


def fold_batchnorms(module: MixNet, variables: dict) -> dict:
    """Training-form variables -> those of `module.clone(deploy=True)`: each BatchNorm folded into the conv before
    it (`kernel * s`, `(bias - mean) * s + beta`, `s = gamma / sqrt(var + eps)`), into every group of a mixed conv
    with the group's channels of `s`; a conv that had no bias gets one."""
    params = {k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(variables["params"], sep="/").items()}
    stats = traverse_util.flatten_dict(variables.get("batch_stats", {}), sep="/")
    for conv, bn, eps, role in _conv_norm_pairs(module, variables):
        mean, var = np.asarray(stats[f"{bn}/mean"], np.float64), np.asarray(stats[f"{bn}/var"], np.float64)
        s = params.pop(f"{bn}/scale", np.ones_like(mean)) / np.sqrt(var + eps)
        shift = params.pop(f"{bn}/bias", np.zeros_like(mean)) - mean * s
        groups = [conv] if role == "weight" else [f"{conv}/{i}" for i in range(sum(
            1 for k in params if k.startswith(f"{conv}/") and k.endswith("/kernel")))]
        start = 0
        for g in groups:
            kernel = params[f"{g}/kernel"]
            part = slice(start, start + kernel.shape[-1])
            start += kernel.shape[-1]
            params[f"{g}/bias"] = params.get(f"{g}/bias", 0.0) * s[part] + shift[part]
            params[f"{g}/kernel"] = kernel * s[part]
        if start != len(s):
            raise ValueError(f"{bn} has {len(s)} channels but {conv} gives {start}")
    x = jnp.zeros((1, 64, 64, module.in_chans), jnp.float32)
    want = traverse_util.flatten_dict(
        jax.eval_shape(lambda: module.clone(deploy=True).init(jax.random.key(0), x))["params"], sep="/")
    for key, leaf in want.items():
        if key not in params and key.endswith("/bias"):  # a conv no BatchNorm followed (none in MixNet)
            params[key] = np.zeros(leaf.shape)
    folded = jax.device_put({k: np.asarray(v, np.float32) for k, v in params.items()})
    return {"params": traverse_util.unflatten_dict(folded, sep="/")}


kinds.register(MixNet, kinds.LayerKind("reparam", reparameterize=fold_batchnorms))


def _build(table, stem: int, width: float, depth: float, tf_port: bool, **overrides) -> MixNet:
    stem_chs = make_divisible(stem * width)
    # MixNet-M and larger round scaled repeats (timm's depth_trunc='round'); S is never depth-scaled
    stages = resolve_stages(table, stem_chs=stem_chs, act="relu", width=width, depth=depth, depth_trunc="round")
    kwargs = dict(
        stages=stages, stem_chs=stem_chs, num_features=1536, head_type="efficientnet", act="relu", se_act="silu",
        se_gate="sigmoid", padding="same" if tf_port else "symmetric", bn_eps=BN_EPS_TF if tf_port else BN_EPS_TORCH,
    )
    return MixNet(**{**kwargs, **overrides})


for _name, (_table, _stem, _width, _depth, _tf, _weights) in VARIANTS.items():
    _fn = partial(_build, _table, _stem, _width, _depth, _tf)
    register_model(
        ModelCfg(name=_name, family="mixnet", feature_info=feature_info(_fn().stages),
                 paper="arXiv:1907.09595 Figure 8", twin=f"timm:{_name}"),
        _weights,
        converters={"timm": timm_rename},
    )(_fn)
