"""Structured channel pruning: a model of the MobileNet stage builder with fewer channels, as an ordinary smaller zoo
model (MobileNetV1/V2/V3, MnasNet, FBNet, LCNet, EfficientNet/-Lite/-V2, TinyNet; MixNet's split convs keep their
widths).

Channels are removed where nothing outside one block, or one block and its reader, depends on them (residual streams
are left alone):

- "mid": the inverted-residual expansion channels (conv_pw out, bn1, conv_dw, bn2, SE reduce-in and expand-out,
  conv_pwl in; in a fused 'er' block conv_exp out, bn1, SE, conv_pwl in), the bulk of the MACs;
- "se": the squeeze-excite reduced channels (conv_reduce out, conv_expand in);
- "cn": the final 1x1 `cn` conv of MobileNetV3 (conv out, bn1, the pooled head conv's input);
- "out": the output of any other block outside a residual stream (neither it nor its reader adds its input), e.g.
  every block of MobileNetV1 and LCNet: the producing conv and BN, and what reads it (the next block's first conv, or
  a depthwise-separable block's depthwise conv, BN and squeeze-excite, or the head);
- "head": the head conv of MobileNetV2/EfficientNet (conv out, bn, classifier input); not in the default scope
  because it changes the pooled feature width that fine-tuned classifiers and distillation read.

Each group keeps its highest-ranked channels, in their original order: `criterion="bn_scale"` ranks by |gamma| of the
BatchNorm after the producing conv (network slimming, Liu et al., arXiv:1708.06519; expansion channels pass two BNs
and rank by the product, since either one can silence them), `"l1"` by the L1 norm of the producing conv's filters
(Li et al., arXiv:1608.08710). The SE reduce conv has no BN: its channels rank by filter L1 under both criteria.
Removed channels are not compensated, so fine-tune afterwards (`train.fit(cfg, model=small)`).

    import zoo
    from compress.prune import prune_channels, save_pruned, load_pruned
    model = zoo.load("tf_efficientnet_lite0")
    small = prune_channels(model, 0.5)                  # half of every block's expansion channels
    small.cfg.name                                       # 'tf_efficientnet_lite0_pruned50'
    zoo.count_macs(small.module, small.variables, (1, 224, 224, 3))
    save_pruned(small, "lite0_p50")                     # JSON architecture + safetensors weights
    again = load_pruned("lite0_p50")
    finer = prune_channels(model, {r"stages_[45]/.*/mid": 0.6})   # per-group ratios by regex; others untouched
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

import zoo
from compress.prune_arch import apply_widths, base_name, check_supported, free_outputs, mixed, pruned_name
from compress.prune_io import load_pruned, save_pruned
from zoo.abstract import abstract_variables
from zoo.convert import flatten_variables
from zoo.models.mobilenet_base import MobileNet, feature_info

__all__ = ["CRITERIA", "DEFAULT_SCOPE", "SCOPES", "ChannelGroup", "channel_groups", "kept_channels",
           "load_pruned", "prune_channels", "save_pruned"]

CRITERIA = ("bn_scale", "l1")
SCOPES = ("mid", "se", "cn", "out", "head")
DEFAULT_SCOPE = ("mid", "se", "cn")
# Networks without expanding blocks (MobileNetV1, LCNet) have little else to prune: their default adds "out".
DEFAULT_SCOPE_WITHOUT_MID = ("se", "cn", "out")
DIVISOR = 8  # kept widths stay multiples of 8: what SIMD kernels (XNNPACK, GPUs' tensor cores) tile by


@dataclass(frozen=True)
class ChannelGroup:
    """Channels kept or removed together: the arrays they index, and what ranks them."""

    name: str  # "stages_3/block_0/mid": the block path and the kind
    kind: str  # one of SCOPES
    size: int
    axes: tuple[tuple[str, int], ...]  # (flat variable name, axis indexed by these channels)
    bns: tuple[str, ...]  # BatchNorm module paths whose |gamma| ranks them ("bn_scale")
    conv: str  # kernel (flat name) whose output filters rank them ("l1", and "bn_scale" when bns is empty)


def _bn(path: str) -> tuple[tuple[str, int], ...]:
    return tuple((f"{col}/{path}/{leaf}", 0) for col, leaf in
                 (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var")))


def _se_channels(p: str) -> tuple[tuple[str, int], ...]:
    """The arrays of a squeeze-excite that index the channels it gates (its input and its gate's output)."""
    return ((f"{p}/se/conv_reduce/kernel", 2), (f"{p}/se/conv_expand/kernel", 3), (f"{p}/se/conv_expand/bias", 0))


# The last conv and BatchNorm of each kind of block: what produces its output channels.
_OUTPUT_LAYERS = {"ds": ("conv_pw", "bn2"), "ir": ("conv_pwl", "bn3"), "er": ("conv_pwl", "bn2"), "cn": ("conv", "bn1")}


def _reader(module: MobileNet, nxt, p: str) -> tuple[tuple[tuple[str, int], ...], tuple[str, ...]]:
    """(arrays indexed by the input channels of the block `nxt` at `p` (None: the head), the BatchNorms on the way
    that can silence a channel). A 'ds' block carries its input through its depthwise conv, BN and squeeze-excite."""
    if nxt is None:
        if module.head_type == "pool":
            return ((("params/head/fc/kernel", 0),) if module.num_classes else ()), ()
        return (("params/head/conv/kernel", 2),), ()
    m = p.split("/", 1)[1]
    if nxt.kind == "ds":
        se = _se_channels(p) if nxt.se_chs else ()
        return ((f"{p}/conv_dw/kernel", 3), *_bn(f"{m}/bn1"), *se, (f"{p}/conv_pw/kernel", 2)), (f"{m}/bn1",)
    first = {"ir": "conv_pw", "er": "conv_exp", "cn": "conv"}[nxt.kind]
    return ((f"{p}/{first}/kernel", 2),), ()


def channel_groups(module: MobileNet) -> list[ChannelGroup]:
    """Every prunable channel group of a MobileNet-family module, in network order."""
    check_supported(module)
    groups = []
    flat = [(i, j, b) for i, blocks in enumerate(module.stages) for j, b in enumerate(blocks)]
    free = free_outputs(module.stages)
    for k, (i, j, b) in enumerate(flat):
        p = f"params/stages_{i}/block_{j}"
        m = p.split("/", 1)[1]
        if b.se_chs:
            groups.append(ChannelGroup(f"{m}/se", "se", b.se_chs, (
                (f"{p}/se/conv_reduce/kernel", 3), (f"{p}/se/conv_reduce/bias", 0),
                (f"{p}/se/conv_expand/kernel", 2)), (), f"{p}/se/conv_reduce/kernel"))
        se = _se_channels(p) if b.se_chs else ()
        if b.kind == "ir" and not mixed(b):
            axes = ((f"{p}/conv_pw/kernel", 3), *_bn(f"{m}/bn1"), (f"{p}/conv_dw/kernel", 3), *_bn(f"{m}/bn2"),
                    *se, (f"{p}/conv_pwl/kernel", 2))
            groups.append(ChannelGroup(f"{m}/mid", "mid", b.mid_chs, axes, (f"{m}/bn1", f"{m}/bn2"),
                                       f"{p}/conv_pw/kernel"))
        elif b.kind == "er":
            axes = ((f"{p}/conv_exp/kernel", 3), *_bn(f"{m}/bn1"), *se, (f"{p}/conv_pwl/kernel", 2))
            groups.append(ChannelGroup(f"{m}/mid", "mid", b.mid_chs, axes, (f"{m}/bn1",), f"{p}/conv_exp/kernel"))
        if (i, j) in free:
            nxt = flat[k + 1] if k + 1 < len(flat) else None
            conv, bn = _OUTPUT_LAYERS[b.kind]
            read, read_bns = _reader(module, nxt and nxt[2], nxt and f"params/stages_{nxt[0]}/block_{nxt[1]}")
            kind = "cn" if b.kind == "cn" and nxt is None else "out"  # the final 1x1 conv into the head: "cn"
            groups.append(ChannelGroup(f"{m}/{kind}", kind, b.out_chs, ((f"{p}/{conv}/kernel", 3), *_bn(f"{m}/{bn}"),
                                       *read), (f"{m}/{bn}", *read_bns), f"{p}/{conv}/kernel"))
    if module.head_type == "efficientnet":
        fc = (("params/head/fc/kernel", 0),) if module.num_classes else ()
        groups.append(ChannelGroup("head/head", "head", module.num_features,
                                   (("params/head/conv/kernel", 3), *_bn("head/bn"), *fc), ("head/bn",),
                                   "params/head/conv/kernel"))
    return groups


def kept_channels(n: int, ratio: float, divisor: int = DIVISOR) -> int:
    """Channels left when removing `ratio` of `n`: a multiple of `divisor`, at least `divisor`, at most `n`."""
    if n <= divisor:
        return n
    return min(n, max(divisor, int(round(n * (1.0 - ratio) / divisor)) * divisor))


def _check_ratio(r, what: str) -> float:
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0.0 < float(r) < 1.0:
        raise ValueError(f"{what} must be a number in (0, 1) (the fraction of channels to remove), got {r!r}")
    return float(r)


def _check_args(model, ratio, criterion, scope) -> tuple[MobileNet, tuple[str, ...]]:
    if not isinstance(model, zoo.Model):
        raise TypeError(f"prune_channels expects a zoo.Model (from zoo.load), got {type(model).__name__}")
    module = check_supported(model.module, f"model '{model.cfg.name}'")
    if isinstance(ratio, Mapping):
        if not ratio:
            raise ValueError("ratio: an empty dict prunes nothing; give {regex: fraction} or one fraction")
        for pattern, r in ratio.items():
            _check_ratio(r, f"ratio[{pattern!r}]")
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ValueError(f"ratio key {pattern!r} is not a regular expression: {e}") from None
    else:
        _check_ratio(ratio, "ratio")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if scope is None:
        has_mid = any(g.kind == "mid" for g in channel_groups(module))
        scope = DEFAULT_SCOPE if has_mid else DEFAULT_SCOPE_WITHOUT_MID
    scope = (scope,) if isinstance(scope, str) else tuple(scope)
    if not scope or set(scope) - set(SCOPES):
        raise ValueError(f"scope must be a non-empty subset of {SCOPES}, got {scope!r}")
    if "head" in scope and module.head_type != "efficientnet":
        raise ValueError("scope 'head' needs a head conv followed by BatchNorm (MobileNetV2, EfficientNet); "
                         f"'{model.cfg.name}' has a '{module.head_type}' head: drop 'head' from scope")
    base_name(model.cfg.name)
    return module, scope


def _ratios(groups: Sequence[ChannelGroup], ratio) -> dict[str, float]:
    """Group name -> fraction to remove (the first matching regex wins for dict ratios)."""
    if not isinstance(ratio, Mapping):
        return {g.name: float(ratio) for g in groups}
    out, used = {}, set()
    for g in groups:
        for pattern, r in ratio.items():
            if re.fullmatch(pattern, g.name):
                out[g.name] = float(r)
                used.add(pattern)
                break
    unused = [p for p in ratio if p not in used]
    if unused:
        raise ValueError(f"ratio keys {unused} match no channel group in scope; group names look like "
                         f"{[g.name for g in groups[:3]]} (see compress.prune.channel_groups)")
    return out


def _scores(group: ChannelGroup, flat: dict[str, np.ndarray], criterion: str) -> np.ndarray:
    if criterion == "bn_scale" and group.bns:
        return np.prod([np.abs(flat[f"params/{bn}/scale"]) for bn in group.bns], axis=0)
    kernel = flat[group.conv]
    return np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)


def prune_channels(model: zoo.Model, ratio: float | Mapping[str, float], *, criterion: str = "bn_scale",
                   scope: str | Sequence[str] | None = None) -> zoo.Model:
    """A smaller `zoo.Model`: same class of module with narrower blocks, and the surviving channels' weights.

    ratio: the fraction of each group's channels to remove, in (0, 1), or {regex: fraction} matched (fullmatch,
        first match wins) against group names such as "stages_3/block_0/mid"; unmatched groups keep all channels.
        Kept widths are rounded to multiples of 8 (at least 8; groups of 8 or fewer channels are kept whole).
    criterion: "bn_scale" or "l1" (see the module docstring). scope: which kinds of groups to prune (`SCOPES`);
        None: `DEFAULT_SCOPE`, or `DEFAULT_SCOPE_WITHOUT_MID` for networks without expanding blocks.
    The result's `cfg.name` is `<base>_pruned<percent of prunable channels removed>`; its preprocessing is the
    input model's. Raises ValueError for bad arguments or unsupported families before doing any work.
    """
    module, scope = _check_args(model, ratio, criterion, scope)
    base = base_name(model.cfg.name)
    groups = [g for g in channel_groups(module) if g.kind in scope]
    ratios = _ratios(groups, ratio)
    expected = flatten_variables(abstract_variables(module, (1, 32, 32, module.in_chans)))
    flat = {k: np.asarray(v) for k, v in zip(flatten_variables(model.variables),
                                              jax.tree_util.tree_leaves(model.variables))}
    if set(flat) != set(expected) or any(flat[k].shape != s for k, s in expected.items()):
        raise ValueError(f"the variables of '{model.cfg.name}' do not fit its module (extra collections or "
                         "shapes); prune the plain float model (after folding any quantization state)")

    keep: dict[str, np.ndarray] = {}
    for g in groups:
        if g.name not in ratios or (k := kept_channels(g.size, ratios[g.name])) == g.size:
            continue
        order = np.argsort(-_scores(g, flat, criterion), kind="stable")
        keep[g.name] = np.sort(order[:k])
    for g in groups:  # slice after ranking, so every group ranks on the original arrays
        if g.name in keep:
            for key, axis in g.axes:
                flat[key] = np.take(flat[key], keep[g.name], axis=axis)

    new = _narrowed(module, {g.name: len(keep.get(g.name, range(g.size))) for g in groups})
    want = flatten_variables(abstract_variables(new, (1, 32, 32, module.in_chans)))
    wrong = [f"{k}: {flat[k].shape} vs {s}" for k, s in want.items() if flat[k].shape != s]
    if wrong:  # an inconsistency between channel_groups and the blocks' code; never expected
        raise AssertionError("sliced variables do not fit the pruned module: " + "; ".join(wrong[:5]))
    variables = jax.device_put(traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()}))

    reference = channel_groups(zoo.create_model(base, num_classes=module.num_classes))
    total = sum(g.size for g in reference if g.kind in scope)
    now = sum(g.size for g in channel_groups(new) if g.kind in scope)
    cfg = model.cfg.replace(name=pruned_name(base, 1.0 - now / total), feature_info=feature_info(new.stages),
                            twin="")  # no longer the twin library's architecture
    return zoo.Model(new, variables, cfg)


def _narrowed(module: MobileNet, widths: dict[str, int]) -> MobileNet:
    """`module` with the group widths given by name (each block's input follows the previous block's output)."""
    table = []
    for i, blocks in enumerate(module.stages):
        row = []
        for j, b in enumerate(blocks):
            m = f"stages_{i}/block_{j}"
            out = widths.get(f"{m}/cn", widths.get(f"{m}/out", b.out_chs))
            row.append({"out_chs": out, "mid_chs": widths.get(f"{m}/mid", b.mid_chs),
                        "se_chs": widths.get(f"{m}/se", b.se_chs)})
        table.append(row)
    stages = apply_widths(module.stages, table)
    num_features = widths.get("head/head", module.num_features)
    if module.head_type == "pool":  # the pooled last stage is the classifier's input
        num_features = stages[-1][-1].out_chs
    return module.clone(stages=stages, num_features=num_features)
