"""Export-time substitutions: the same function, written with ops the target runs fast.

Four of them: hard-swish for full-int8 graphs (below), ReLU moved before a concatenation in full-int8 graphs
(`relu_before_concatenate`), the exact GELU in float graphs (`gelu_float_friendly`) and float depthwise weights in
dynamic-range graphs (`float_depthwise_weights`).

Hard-swish: the TFLite converter turns `x * relu6(x + 3) / 6` into one HARD_SWISH op. XNNPACK runs it in float, but
has no int8 kernel for it in this LiteRT (2.3): in a full-int8 MobileNetV3 each of the 21 HARD_SWISH ops falls back to
a builtin kernel and splits the graph into 22 delegate partitions, and the int8 model runs slower than fp32
(FINDINGS; measured again here: 8.7 ms int8 vs 5.8 ms fp32 at 224x224, 1 thread). Written as
`(x * 1/6) * relu6(x + 3)` the converter no longer recognises the pattern and emits MUL, ADD (with fused RELU6) and
MUL, all of which XNNPACK runs in int8: one partition, 3.7 ms. The substitution is exact in real arithmetic (float
results differ by rounding only), so it is applied to full-int8 exports only, where it pays; float graphs keep the
single HARD_SWISH op.

The models look activations up by name at trace time (`zoo.layers.activations.get_act`), so the substitution swaps
entries of that table for the duration of a trace.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import numpy as np

from zoo.abstract import per_module_and_shape


def hard_swish_int8_friendly(x):
    """hard_swish(x) = x * relu6(x + 3) / 6, ordered so that the converter keeps it as MUL / ADD+RELU6 / MUL."""
    return (x * (1.0 / 6.0)) * jax.nn.relu6(x + 3.0)



# erf(x) = x P(x^2) / Q(x^2) on x clamped to [-4, 4] (beyond, erf is +-1 in float32): the rational approximation
# Eigen and XLA:CPU evaluate for float32 erf; within 4.2e-7 of erf everywhere (checked in the tests).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def erf_rational(x):
    x = jax.lax.min(jax.lax.max(x, -4.0), 4.0)  # not jnp.clip: its own jit would drop the caller's name scope
    x2 = x * x
    p, q = _ERF_P[0], _ERF_Q[0]
    for c in _ERF_P[1:]:
        p = p * x2 + c
    for c in _ERF_Q[1:]:
        q = q * x2 + c
    return x * p / q


def gelu_float_friendly(x):
    """The exact GELU, x * (1 + erf(x / sqrt 2)) / 2, with erf as MUL/ADD/DIV/MINIMUM/MAXIMUM.

    jax lowers erf to piecewise polynomials chosen by comparisons, which the converter emits as LESS, SELECT and
    SELECT_V2: XNNPACK runs none of them, so every GELU of a float ConvNeXt-atto left the delegate (37 partitions).
    Written as one rational function every op is delegated; the result is the exact GELU's within float32 rounding.
    """
    return 0.5 * x * (1.0 + erf_rational(x * 0.7071067811865476))


# Applied to float exports (fp32, fp16, dynamic range).
FLOAT_ACTIVATIONS: Mapping[str, Callable] = {"gelu": gelu_float_friendly}

# Ops traced under this name scope stay float in a full-int8 file (`int8_keep_float="auto"` adds it to the layers
# the layer-kinds table keeps float): activations XNNPACK has no int8 kernel for.
INT8_FLOAT_SCOPE = "int8_float"


def gelu_int8_float_island(x):
    """The exact GELU in a full-int8 file: `gelu_float_friendly`, kept float. Traced as jax lowers erf, its LESS and
    SELECT ops in int8 made LiteRT abort while allocating ConvNeXt's int8 file; quantized, its DIV, MINIMUM and
    MAXIMUM fall off XNNPACK's int8 path (ConvNeXt-atto: 25 partitions)."""
    with jax.named_scope(INT8_FLOAT_SCOPE):
        return gelu_float_friendly(x)


# Applied to full-int8 exports (see the module docstring and each function for the measurement behind each entry).
INT8_ACTIVATIONS: Mapping[str, Callable] = {"hard_swish": hard_swish_int8_friendly, "gelu": gelu_int8_float_island}
# Those of them traced under INT8_FLOAT_SCOPE: a model using one needs the scope in its int8 keep-float pattern.
INT8_FLOAT_ACTIVATIONS = frozenset({"gelu"})


@per_module_and_shape
def activations_used(module, variables, x) -> frozenset[str]:
    """Names of the zoo activations `module`'s forward pass looks up (`zoo.layers.activations.get_act`), from an
    abstract trace on `x` (a shape-dtype struct or an array)."""
    from zoo.layers.activations import ACTIVATIONS, override_activations

    used: set[str] = set()

    def recording(name, fn):
        def act(v):
            used.add(name)
            return fn(v)
        return act

    with override_activations({n: recording(n, f) for n, f in ACTIVATIONS.items()}):
        jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x)
    return frozenset(used)



def relu_before_concatenate(fn: Callable) -> Callable:
    """`fn` with every `relu(concatenate(parts))` computed as `concatenate(relu(part) for part in parts)`.

    Exact (ReLU is elementwise). A mixed conv (MixNet) concatenates its groups' outputs and the block's ReLU follows
    the concatenation, so the converter cannot fuse it into a conv: it stays a standalone int8 RELU, which the LiteRT
    XNNPACK delegate runs in float only (mixnet_s: two such RELUs split the int8 graph into 3 partitions). Applied
    to each part, the ReLU directly follows each group's conv and fuses into it.
    """
    from jax._src import source_info_util  # jax's own evaluator keeps each equation's name stack the same way
    from jax.extend.core import Literal

    def run(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        jaxpr = closed.jaxpr
        uses: dict = {}
        for v in [v for e in jaxpr.eqns for v in e.invars] + list(jaxpr.outvars):
            if not isinstance(v, Literal):
                uses[v] = uses.get(v, 0) + 1
        concatenations = {e.outvars[0] for e in jaxpr.eqns if e.primitive.name == "concatenate"}
        moved = {id(e) for e in jaxpr.eqns if _is_relu(e) and not isinstance(e.invars[0], Literal)
                 and e.invars[0] in concatenations and uses[e.invars[0]] == 1}
        if not moved:  # nothing to move: the function as it is
            return fn(*args)
        env = dict(zip(jaxpr.constvars, closed.consts))
        env.update(zip(jaxpr.invars, jax.tree_util.tree_leaves(args)))
        read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
        parts_of = {}  # a concatenation's output var -> (parts, axis)
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            # each op keeps its module path (the name stack): tensor names in the file come from it, and
            # `int8_keep_float` and the row split select ops by them
            with source_info_util.user_context(eqn.source_info.traceback, name_stack=(
                    source_info_util.current_name_stack() + eqn.source_info.name_stack)), eqn.ctx.manager:
                if id(eqn) in moved:
                    parts, axis = parts_of[eqn.invars[0]]
                    outs = [jax.lax.concatenate([jax.nn.relu(p) for p in parts], axis)]
                else:
                    outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                    outs = outs if eqn.primitive.multiple_results else [outs]
            if eqn.primitive.name == "concatenate":
                parts_of[eqn.outvars[0]] = (invals, eqn.params["dimension"])
            env.update(zip(eqn.outvars, outs))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape),
                                            [read(v) for v in jaxpr.outvars])

    return run


def _is_relu(eqn) -> bool:
    """Whether `eqn` computes max(x, 0) of its one input: `jax.nn.relu` (a custom-JVP function around a jitted
    `max`) or a bare `max` with a literal zero."""
    from jax.extend.core import Literal

    while eqn.primitive.name != "max":
        inner = eqn.params.get("call_jaxpr", eqn.params.get("jaxpr"))
        inner = getattr(inner, "jaxpr", inner)
        if inner is None or len(inner.eqns) != 1 or len(eqn.invars) != 1:
            return False
        eqn = inner.eqns[0]
    literals = [v for v in eqn.invars if isinstance(v, Literal)]
    return len(eqn.invars) == 2 and len(literals) == 1 and np.all(np.asarray(literals[0].val) == 0)


def activation_overrides(overrides: Mapping[str, Callable] | None):
    """Trace models with `overrides` (activation name -> function) in place of the zoo's definitions."""
    from zoo.layers.activations import override_activations

    return override_activations(overrides or {})


def float_depthwise_weights(content: bytes) -> tuple[bytes, int]:
    """Dynamic-range models: store DEPTHWISE_CONV_2D weights as float32 again (dequantized), so those ops run float.

    Dynamic-range quantization gives every convolution int8 weights, and the LiteRT XNNPACK delegate runs such
    "hybrid" CONV_2D and FULLY_CONNECTED ops but not hybrid DEPTHWISE_CONV_2D: each one falls back to a builtin kernel
    and splits the graph (MobileNetV2: 16 delegate partitions, 15 depthwise ops off XNNPACK). Depthwise weights are
    ~2-3% of a mobile network's parameters, so keeping them float costs little size. Returns the new flatbuffer and
    the number of weight tensors changed (0: the input is returned unchanged).
    """
    import flatbuffers

    from export.ops_report import _enum_names, _schema

    s = _schema()
    model = s.ModelT.InitFromObj(s.Model.GetRootAs(content, 0))
    names = _enum_names(s.BuiltinOperator)
    dw_codes = {i for i, oc in enumerate(model.operatorCodes or [])
                if names.get(max(oc.builtinCode, oc.deprecatedBuiltinCode)) == "DEPTHWISE_CONV_2D"}
    changed = 0
    for g in model.subgraphs or []:
        for op in g.operators or []:
            if op.opcodeIndex not in dw_codes or len(op.inputs) < 2:
                continue
            w = g.tensors[op.inputs[1]]
            q = w.quantization
            if w.type != s.TensorType.INT8 or q is None or q.scale is None or len(q.scale) == 0:
                continue
            buf = model.buffers[w.buffer]
            if buf.data is None or len(buf.data) == 0:
                continue
            shape = [int(d) for d in w.shape]
            arr = np.frombuffer(bytes(np.asarray(buf.data, np.uint8)), np.int8).reshape(shape).astype(np.float32)
            scale = np.asarray(q.scale, np.float32)
            zero = np.asarray(q.zeroPoint if q.zeroPoint is not None else np.zeros_like(scale), np.float32)
            bshape = [1] * len(shape)
            if len(scale) > 1:
                bshape[q.quantizedDimension] = len(scale)
            arr = (arr - zero.reshape(bshape)) * scale.reshape(bshape)
            buf.data = np.frombuffer(arr.astype(np.float32).tobytes(), np.uint8)
            w.type, w.quantization = s.TensorType.FLOAT32, None
            changed += 1
    if not changed:
        return content, 0
    builder = flatbuffers.Builder(len(content) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), changed
