"""Parameter and multiply-accumulate counts.

MACs are counted by walking the jaxpr of the forward pass: convolutions and matrix products only (the convention of
torchvision's docs and of `macs_conv_matmul` in the reference table). XLA's cost analysis undercounts padded
convolutions, so it is not used.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from zoo.layers.conv import depthwise_impl


def count_params(params) -> int:
    """Number of trainable parameters (pass `variables["params"]`; batch statistics are not parameters)."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def _eqn_macs(eqn) -> int:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
        out = eqn.outvars[0].aval.shape
        rhs = eqn.invars[1].aval.shape
        dn = eqn.params["dimension_numbers"]
        # MACs per output element = kernel spatial size * input channels per group = prod(rhs) / out_features.
        out_feat = rhs[dn.rhs_spec[0]]
        return math.prod(out) * math.prod(rhs) // out_feat
    if name == "dot_general":
        out = eqn.outvars[0].aval.shape
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
    return 0


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        for item in v if isinstance(v, (list, tuple)) else (v,):
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def count_jaxpr_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += _eqn_macs(eqn)
        for sub in _sub_jaxprs(eqn):
            total += count_jaxpr_macs(sub)
    return total


def count_macs(module, variables, input_shape: tuple[int, ...], **apply_kwargs) -> int:
    """MACs of one forward pass of `module` on a float32 input of `input_shape` (NHWC, batch included)."""
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    # Depthwise convs must appear as convolutions, not as the CPU-friendly sum of shifted slices.
    with depthwise_impl("native"):
        closed = jax.make_jaxpr(lambda v, x: module.apply(v, x, **apply_kwargs))(variables, x)
    return count_jaxpr_macs(closed.jaxpr)
