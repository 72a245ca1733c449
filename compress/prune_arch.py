"""The architecture side of channel pruning: which MobileNet-family widths can change, and naming the result.

A pruned network is the registered base architecture with other per-block channel widths (`mid_chs`, `se_chs`, the
`out_chs` of blocks outside residual streams) and possibly another `num_features`. This module reads those widths from a module,
applies them to the registered base (`zoo.create_model(base, stages=...)`), and names pruned models
`<base>_pruned<percent>`, so a saved file needs nothing but the base name and a table of integers.

    from compress.prune_arch import block_widths, rebuild
    widths = block_widths(small.module)                       # [[{"mid_chs": 48, "se_chs": 0, "out_chs": 16}, ...]]
    module = rebuild("tf_efficientnet_lite0", widths, {"num_classes": 10})
"""

from __future__ import annotations

import re
from dataclasses import replace

import zoo
from zoo.models.mobilenet_base import MobileNet
from zoo.registry import UnknownModelError, get_entry

SUPPORTED = ("the families built on the MobileNet stage builder (MobileNetV1/V2/V3, MnasNet, FBNet, LCNet, "
             "EfficientNet/-Lite/-V2, TinyNet, MixNet: modules of class MobileNet)")
WIDTH_FIELDS = ("mid_chs", "se_chs", "out_chs")
# Module fields a saved pruned model may carry besides the widths (anything else must equal the registry's).
MODULE_FIELDS = ("num_classes", "in_chans", "num_features", "drop_rate", "drop_path_rate")
_PRUNED_NAME = re.compile(r"^(?P<base>.+)_pruned\d+$")


def check_supported(module, what: str = "model") -> MobileNet:
    """The module itself, or a ValueError naming the supported families."""
    if not isinstance(module, MobileNet):
        raise ValueError(f"channel pruning supports {SUPPORTED}; the {what} is a {type(module).__name__}")
    return module


def base_name(cfg_name: str) -> str:
    """The registered architecture a (possibly already pruned) model's name refers to."""
    for name in (cfg_name, (_PRUNED_NAME.match(cfg_name) or {"base": None})["base"]):
        if name is None:
            continue
        try:
            return get_entry(name).name
        except UnknownModelError:
            continue
    raise ValueError(f"'{cfg_name}' is neither a registered model nor '<registered>_pruned<N>': pruned models are "
                     "saved as their base architecture plus channel widths, so the base must be in `zoo.list_models()`")


def pruned_name(base: str, removed_fraction: float) -> str:
    return f"{base}_pruned{int(round(100 * removed_fraction))}"


MIRRORING = ("ds", "cn")  # blocks whose middle width is their input's (no expansion)
KNOWN_KINDS = ("ds", "ir", "er", "cn")  # the block kinds whose layers pruning knows; others keep every width


def has_skip(b) -> bool:
    """Whether the block adds its input to its output (so both belong to one residual stream)."""
    if b.kind == "cn":
        return b.skip and b.stride == 1 and b.in_chs == b.out_chs
    return b.stride == 1 and b.in_chs == b.out_chs and not b.noskip


def mixed(b) -> bool:
    """A MixNet block: its convs split the channels into groups of fixed proportions."""
    return isinstance(b.kernel, tuple) or getattr(b, "exp_splits", 1) > 1 or getattr(b, "pwl_splits", 1) > 1


def free_outputs(stages) -> set[tuple[int, int]]:
    """(stage, block) of every block whose output width may change: neither it nor the block reading its output
    adds a residual, and both convs touching those channels are ordinary ones (the head reads the last output)."""
    flat = [(i, j, b) for i, stage in enumerate(stages) for j, b in enumerate(stage)]
    free = set()
    for k, (i, j, b) in enumerate(flat):
        nxt = flat[k + 1][2] if k + 1 < len(flat) else None
        if b.kind not in KNOWN_KINDS or has_skip(b) or mixed(b):
            continue
        if nxt is not None and (nxt.kind not in KNOWN_KINDS or has_skip(nxt) or mixed(nxt)):
            continue
        free.add((i, j))
    return free


def block_widths(module: MobileNet) -> list[list[dict[str, int]]]:
    """Per stage, per block: the channel widths pruning may change."""
    return [[{f: getattr(b, f) for f in WIDTH_FIELDS} for b in stage] for stage in module.stages]


def apply_widths(stages, widths) -> tuple:
    """`stages` with the given widths; each block's `in_chs` follows the previous block's `out_chs`."""
    if [len(s) for s in stages] != [len(w) for w in widths]:
        raise ValueError(f"widths have {[len(w) for w in widths]} blocks per stage, the base architecture "
                         f"{[len(s) for s in stages]}")
    out, in_chs, free = [], stages[0][0].in_chs, free_outputs(stages)
    for i, (stage, stage_w) in enumerate(zip(stages, widths)):
        blocks = []
        for j, (b, w) in enumerate(zip(stage, stage_w)):
            where = f"stages_{i}/block_{j}"
            if set(w) != set(WIDTH_FIELDS) or not all(isinstance(v, int) and v >= 0 for v in w.values()):
                raise ValueError(f"{where}: widths must be non-negative integers {WIDTH_FIELDS}, got {w}")
            if w["out_chs"] != b.out_chs and (i, j) not in free:
                raise ValueError(f"{where}: out_chs {w['out_chs']} != {b.out_chs}; this output is on a residual "
                                 "stream (or read by a split conv), so its width is fixed")
            if (w["se_chs"] == 0) != (b.se_chs == 0):
                raise ValueError(f"{where}: widths {w} do not fit a '{b.kind}' block with se_chs={b.se_chs}")
            nb = replace(b, in_chs=in_chs, **w)
            if b.kind in MIRRORING:  # no expansion: mid_chs mirrors in_chs
                nb = replace(nb, mid_chs=in_chs)
            if not has_skip(b) and b.kind != "cn" and nb.stride == 1 and nb.in_chs == nb.out_chs:
                # narrower widths may make in == out: a block that had no residual must not gain one
                nb = replace(nb, noskip=True)
            blocks.append(nb)
            in_chs = nb.out_chs
        out.append(tuple(blocks))
    return tuple(out)


def rebuild(base: str, widths, fields: dict) -> MobileNet:
    """`zoo.create_model(base, stages=<base stages with widths>, **fields)`."""
    unknown = set(fields) - set(MODULE_FIELDS)
    if unknown:
        raise ValueError(f"unsupported module fields {sorted(unknown)}; a pruned model may set {MODULE_FIELDS}")
    reference = check_supported(zoo.create_model(base), f"registered model '{base}'")
    return zoo.create_model(base, stages=apply_widths(reference.stages, widths), **fields)


def module_fields(module: MobileNet, base: str) -> dict:
    """The fields `rebuild` needs to reproduce `module`; raises when `module` differs from `base` in other ways."""
    fields = {f: getattr(module, f) for f in MODULE_FIELDS}
    rebuilt = rebuild(base, block_widths(module), fields)
    if rebuilt != module:
        differ = [f for f in module.__dataclass_fields__ if f not in ("parent", "name")
                  and getattr(rebuilt, f) != getattr(module, f)]
        raise ValueError(f"the module differs from registered '{base}' in {differ}, which a pruned model does not "
                         f"record (it records channel widths and {MODULE_FIELDS})")
    return fields
