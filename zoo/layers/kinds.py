"""The layer-kinds table: what every layer class of the zoo is, asked by every pass in compress and export.

QAT, BN folding, bias correction, activation equalization, the int8 row split, pruning and the int8 keep-float choice
all need to know "is this a weight layer, which kernel axis holds the output channels, is it a norm that folds into
the layer before it?". They ask here instead of naming classes, so a new layer kind (Linear+BatchNorm, a multi-branch
re-parameterizable conv) is registered once:

    from zoo.layers import kinds
    kinds.register(MyConv, kinds.LayerKind("weight", out_axis=-1, in_axis=-2, spatial_axes=(0, 1)))

A layer that holds parameters itself but whose class is not registered is an error when a pass meets it
(`check_known`), naming the module: a pass never skips a layer it does not understand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import flax.linen as nn
import jax

from zoo.abstract import per_module_and_shape, structure_trace

Role = Literal["weight", "norm", "attention", "reparam", "group"]


class UnknownLayerKindError(TypeError):
    """A module holds parameters of its own, but its class is not in the layer-kinds table."""


@dataclass(frozen=True)
class LayerKind:
    """What one layer class is.

    role: "weight" (a kernel that multiplies its input: conv, dense), "norm", "attention" (a block whose softmax and
      matrix products of activations are not weight layers), "reparam" (a multi-branch block with a deploy form),
      "group" (weight layers on channel groups whose outputs are concatenated, MixNet's mixed conv: the weight
      layers are its children, a norm after it sees no single weight layer's output).
    out_axis / in_axis / spatial_axes: where a weight layer's kernel keeps output channels, input channels, taps.
    folds: a norm that is an affine map per channel at inference, so it folds into the weight layer before it.
    int8: "int8" when the converter's int8 kernels run it well, "float" when an int8 export keeps it in float
      (LayerNorm's statistics, softmax attention: XNNPACK has no int8 path for them).
    reparameterize: `fn(module, variables) -> deploy variables` of one module (its own subtree, every collection):
      multi-branch blocks to one conv, Linear+BatchNorm to one Dense. The module then runs with `deploy=True`.
    """

    role: Role
    out_axis: int = -1
    in_axis: int | None = None
    spatial_axes: tuple[int, ...] = ()
    folds: bool = False
    int8: Literal["int8", "float"] = "int8"
    reparameterize: Callable[[nn.Module, dict], dict] | None = None


_TABLE: dict[type, LayerKind] = {}


def register(cls: type, kind: LayerKind) -> type:
    """Enter `cls` (and its subclasses, unless they register their own kind) into the table. Returns `cls`."""
    if cls in _TABLE and _TABLE[cls] != kind:
        raise ValueError(f"layer class {cls.__qualname__} is registered twice with different kinds")
    _TABLE[cls] = kind
    return cls


def kind_of(module: nn.Module) -> LayerKind | None:
    """The registered kind of `module`'s class (the nearest registered base class), or None."""
    for cls in type(module).__mro__:
        if cls in _TABLE:
            return _TABLE[cls]
    return None


def is_weight_layer(module: nn.Module) -> bool:
    kind = kind_of(module)
    return kind is not None and kind.role == "weight"


def is_folding_norm(module: nn.Module) -> bool:
    """A norm that is an affine map per output channel at inference (BatchNorm): it folds into the layer before it."""
    kind = kind_of(module)
    return kind is not None and kind.role == "norm" and kind.folds


def is_depthwise(module: nn.Module, in_channels: int) -> bool:
    """A grouped weight layer with one input channel per output channel (a depthwise conv)."""
    groups = getattr(module, "groups", 1)
    return is_weight_layer(module) and groups > 1 and groups == in_channels == getattr(module, "features", -1)


def is_pointwise(module: nn.Module) -> bool:
    """A 1x1, stride-1, ungrouped conv: a matrix product over channels at every pixel."""
    kind = kind_of(module)
    if kind is None or kind.role != "weight" or not kind.spatial_axes:
        return False
    ks = getattr(module, "kernel_size", 1)
    ks = (ks, ks) if isinstance(ks, int) else tuple(ks)
    return ks == (1, 1) and getattr(module, "stride", 1) == 1 and getattr(module, "groups", 1) == 1


def keeps_float_in_int8(module: nn.Module) -> bool:
    kind = kind_of(module)
    return kind is not None and kind.int8 == "float"


def _own_params(module: nn.Module) -> list[str]:
    """Names of the parameters `module` declares itself (not those of its submodules); [] when unbound."""
    try:
        params = module.variables.get("params", {})
    except Exception:  # an unbound module: nothing to check yet
        return []
    return [k for k, v in params.items() if not isinstance(v, dict) and hasattr(v, "shape")]


def check_known(module: nn.Module, what: str) -> None:
    """Raise `UnknownLayerKindError` if `module` holds parameters itself but its class is not registered.

    Call from a pass's interceptor after the module ran (its variables are then bound). `what` names the pass.
    """
    if kind_of(module) is not None:
        return
    own = _own_params(module)
    if own:
        path = "/".join(module.path) or type(module).__name__
        raise UnknownLayerKindError(
            f"{what}: module '{path}' ({type(module).__qualname__}) holds parameters {own} but its layer kind is "
            f"unknown; register it with zoo.layers.kinds.register({type(module).__name__}, LayerKind(...))")


def interceptor_checking(what: str):
    """A `flax.linen.intercept_methods` interceptor that only runs `check_known` on every module call."""

    def intercept(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        if ctx.method_name == "__call__":
            check_known(ctx.module, what)
        return out

    return intercept


def check_model(module: nn.Module, variables: dict, x, what: str = "pass") -> None:
    """Trace `module` abstractly on `x` and raise for the first parameter-holding module of an unknown kind."""
    with nn.intercept_methods(interceptor_checking(what)), structure_trace():
        jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x)


def _register_builtin() -> None:
    from zoo.layers.conv import Conv2d

    register(Conv2d, LayerKind("weight", out_axis=-1, in_axis=-2, spatial_axes=(0, 1)))  # HWIO
    register(nn.Dense, LayerKind("weight", out_axis=-1, in_axis=0))  # (in, out)
    register(nn.BatchNorm, LayerKind("norm", folds=True))
    register(nn.LayerNorm, LayerKind("norm", int8="float"))
    register(nn.GroupNorm, LayerKind("norm", int8="float"))
    from zoo.layers.mixed_conv import MixedConv2d

    register(MixedConv2d, LayerKind("group"))


_register_builtin()


@per_module_and_shape
def float_in_int8_pattern(module: nn.Module, variables: dict, x) -> str | None:
    """A regex over module paths matching every layer whose kind stays float in an int8 export (None: no such layer).

    The paths come from tracing `module` abstractly on `x`; the pattern matches a path wherever it appears in a
    slash-separated name (TFLite tensor names carry the flax module path).
    """
    import re

    paths: set[str] = set()

    def record(next_fun, args, kwargs, ctx):
        if ctx.method_name == "__call__" and keeps_float_in_int8(ctx.module):
            paths.add("/".join(ctx.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x)
    if not paths:
        return None
    return "(^|/)(" + "|".join(re.escape(p) for p in sorted(paths)) + ")/"
