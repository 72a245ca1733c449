"""Export-time substitution: a 1x1 map broadcast over a feature map, then concatenated, traced as a bilinear resize.

DeepLabV3's ASPP pools its input to one pixel, convolves it and spreads it back over the map before concatenating
it with the other branches (`zoo.layers.aspp`: `jnp.broadcast_to`, which is what upsampling a 1x1 map bilinearly
gives). The converter emits that as BROADCAST_TO, which the LiteRT XNNPACK delegate does not run: the op falls back
to a builtin kernel and splits the graph (deeplabv3_mobilenet_v3_large, fp32: 2 partitions). Resizing the 1x1 map
bilinearly to the map's size is the same function exactly (every output pixel reads the one input pixel with weights
summing to 1), and `zoo.layers.resize` traces it as one RESIZE_BILINEAR op, which XNNPACK runs in float and int8.

Only broadcasts of an NHWC map with a 1x1 spatial extent whose result feeds concatenations alone are rewritten: a
broadcast feeding an elementwise op (squeeze-excite's scale, a bias) becomes a broadcasting MUL or ADD in the file
already.
"""

from __future__ import annotations

from typing import Callable

import jax


def _is_pixel_spread(eqn, consumers) -> bool:
    """`broadcast_in_dim` of an (N, 1, 1, C) map to (N, H, W, C), read by concatenations only."""
    from jax.extend.core import Literal

    if eqn.primitive.name != "broadcast_in_dim" or isinstance(eqn.invars[0], Literal):
        return False
    src, dst = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    return (len(src) == 4 and src[1:3] == (1, 1) and len(dst) == 4 and dst[1] * dst[2] > 1
            and (src[0], src[3]) == (dst[0], dst[3]) and tuple(eqn.params["broadcast_dimensions"]) == (0, 1, 2, 3)
            and bool(consumers.get(eqn.outvars[0])) and all(c == "concatenate" for c in consumers[eqn.outvars[0]]))


def broadcast_as_resize(fn: Callable, counts: dict | None = None) -> Callable:
    """`fn` with every broadcast of a 1x1 map that feeds concatenations computed as a bilinear resize (module doc);
    `fn` itself when it has none. `counts`, when given, receives at trace time the number of broadcasts rewritten
    ("rewritten") and of bilinear resizes the traced function holds, those included ("resizes")."""
    from jax._src import source_info_util  # as export.rewrites: each equation keeps its name stack
    from jax.extend.core import Literal

    from zoo.layers.resize import COMPOSITE_NAME, resize_bilinear

    def run(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        jaxpr = closed.jaxpr
        consumers: dict = {}
        for e in jaxpr.eqns:
            for v in e.invars:
                if not isinstance(v, Literal):
                    consumers.setdefault(v, []).append(e.primitive.name)
        for v in jaxpr.outvars:
            if not isinstance(v, Literal):
                consumers.setdefault(v, []).append("output")
        spread = {id(e) for e in jaxpr.eqns if _is_pixel_spread(e, consumers)}
        if counts is not None:
            counts.update(rewritten=len(spread), resizes=len(spread) + count_composites(jaxpr, COMPOSITE_NAME))
        if not spread:
            return fn(*args)
        env = dict(zip(jaxpr.constvars, closed.consts))
        env.update(zip(jaxpr.invars, jax.tree_util.tree_leaves(args)))
        read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            with source_info_util.user_context(eqn.source_info.traceback, name_stack=(
                    source_info_util.current_name_stack() + eqn.source_info.name_stack)), eqn.ctx.manager:
                if id(eqn) in spread:
                    outs = [resize_bilinear(invals[0], eqn.outvars[0].aval.shape[1:3])]
                else:
                    outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                    outs = outs if eqn.primitive.multiple_results else [outs]
            env.update(zip(eqn.outvars, outs))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape),
                                            [read(v) for v in jaxpr.outvars])

    return run


def count_composites(jaxpr, name: str) -> int:
    """How many `stablehlo.composite` calls named `name` a jaxpr holds, in nested jaxprs too."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "composite" and eqn.params.get("name") == name:
            n += 1
            continue
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += count_composites(inner, name)
    return n
