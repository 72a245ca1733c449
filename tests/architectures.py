"""Which registered models are the same graph up to sizes: family lists for the tests come from the registry.

Width and depth multipliers change channel counts and repeats, never which ops a network traces to, so a check of
what the exporter or a pass does with each kind of op needs one model per distinct architecture, not per name. Two
models are the same architecture when they belong to the same family and their jaxprs (inference, a small input)
use the same set of op signatures: the primitive, and for convolutions whether they are dense, depthwise or grouped
otherwise, and whether their padding is symmetric (PyTorch's) or not (TensorFlow's "SAME"). A new family or variant enters every test that uses
these lists without editing them.
"""

from __future__ import annotations

import functools

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp

import zoo
from zoo.registry import get_entry

SIGNATURE_HW = (64, 64)  # small, and divisible by every family's largest stride


def families() -> dict[str, list[str]]:
    """family -> its registered names (registry order)."""
    out: dict[str, list[str]] = {}
    for name in zoo.list_models():
        out.setdefault(get_entry(name).cfg.family, []).append(name)
    return out


def smallest(names: list[str]) -> str:
    """The member with the fewest parameters (abstract shapes only; no compile)."""
    return min(names, key=lambda n: (_param_count(n), n))


@functools.cache
def _param_count(name: str) -> int:
    module = zoo.create_model(name)
    shape = (1, *SIGNATURE_HW, 3)
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape)))
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(variables["params"]))


def _op_token(eqn, constant: set) -> tuple:
    if eqn.primitive.name == "conv_general_dilated":
        if eqn.invars[1] in constant:  # a fixed filter (a blur pool), not a weight layer
            return ("fixed_conv",)
        groups = eqn.params["feature_group_count"]
        kernel = eqn.invars[1].aval.shape
        per_group_in = kernel[eqn.params["dimension_numbers"].rhs_spec[1]]
        kind = "dense" if groups == 1 else "depthwise" if per_group_in == 1 else "grouped"
        symmetric = all(lo == hi for lo, hi in eqn.params["padding"])
        return ("conv", kind, symmetric)
    return (eqn.primitive.name,)


@functools.cache
def op_signature(name: str) -> frozenset:
    module = zoo.create_model(name)
    shape = (1, *SIGNATURE_HW, 3)
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape)))
    jaxpr = jax.make_jaxpr(lambda v, x: module.apply(v, x))(variables, jax.ShapeDtypeStruct(shape, jnp.float32))
    tokens: set[tuple] = set()

    def walk(j, constant: set) -> None:
        """`constant`: the variables computed from constants only (not from the variables or the input)."""
        for eqn in j.eqns:
            tokens.add(_op_token(eqn, constant))
            if all(isinstance(v, jex_core.Literal) or v in constant for v in eqn.invars):
                constant.update(eqn.outvars)
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    walk(inner, set(getattr(inner, "constvars", ())))

    walk(jaxpr.jaxpr, set(jaxpr.jaxpr.constvars))
    return frozenset(tokens)


def distinct_architectures(names: list[str]) -> dict[str, list[str]]:
    """representative -> the names with its family and op signature; the representative is the smallest."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        groups.setdefault((get_entry(name).cfg.family, op_signature(name)), []).append(name)
    return {smallest(members): members for members in groups.values()}
