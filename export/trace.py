"""JAX -> TensorFlow: functions of a model's variables as TF concrete functions, via jax2tf native serialization.

The one place that calls jax2tf. Choices made here, for every export:
- depthwise convolutions are traced as native grouped convolutions, which the converter turns into
  DEPTHWISE_CONV_2D (the CPU default, shifted slices, would become dozens of slices and muls); a kernel of more taps
  than XNNPACK runs fast becomes several such convs over blocks of it, summed (`depthwise_impl("tiled")`: a 7x7
  kernel ran 5-10x slower in fp32 and 50-100x slower in int8 as one op, see `zoo.layers.conv`);
- variables become constants of the StableHLO module (`params="constants"`, the default) or arguments of the
  converted function held as tf.Variables that the converter freezes (`params="arguments"`). Either way the TFLite
  converter sees constant weights, folds BatchNorm into the convolutions and quantizes the weights; the graphs are
  op-for-op the same (checked in tests/test_export.py). Constants convert 2-8x faster (EfficientNet-B3: 8.8 s against
  18.6 s; MobileNetV3-Small: 0.7 s against 5.6 s), because freezing tf.Variables copies every weight through a
  GraphDef. Arguments are what quantization tooling that looks for weights among the arguments (Qwix) needs
  (FINDINGS).
- the serialized StableHLO targets a version TensorFlow's deserializer reads: jax 0.10.2 writes 1.15.0 by default
  while TF 2.21 reads up to 1.13.7, which once failed as "failed to deserialize portable artifact" (FINDINGS);
- lowering is for the "cpu" platform whatever backend JAX runs on, so that no GPU custom calls end up in the module.
"""

from __future__ import annotations

import contextlib
import os
from functools import partial
from typing import Callable, Iterator, Mapping

import numpy as np


def import_tf():
    """TensorFlow, imported on first use with its C++ INFO/WARNING logs off unless the user set a level."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the install
        raise ModuleNotFoundError("TFLite export needs TensorFlow: pip install tensorflow", name=e.name) from None
    return tf


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def stablehlo_versions() -> dict[str, str]:
    """StableHLO versions: what JAX writes by default, what TF reads, and the target used for export."""
    from jax._src.lib.mlir.dialects import hlo

    jax_default = hlo.get_version_from_compatibility_requirement(hlo.StablehloCompatibilityRequirement.WEEK_4)
    out = {"jax_current": hlo.get_current_version(), "jax_default": jax_default}
    try:
        from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo

        out["tf_reads"] = tf_stablehlo.get_current_version()
    except (ImportError, AttributeError):
        out["tf_reads"] = jax_default
    out["target"] = min(jax_default, out["tf_reads"], key=_version_tuple)
    return out


@contextlib.contextmanager
def stablehlo_target(version: str) -> Iterator[None]:
    """Serialize exported StableHLO at `version` (jax's `_module_to_bytecode` is the only place it is chosen).

    JAX has no public option for the target version; if its internals moved, the export proceeds at JAX's default
    and a version mismatch surfaces as the converter's deserialization error, which `to_tflite` explains.
    """
    try:
        from jax._src.export import _export
        from jax._src.lib import _jax

        original = _export._module_to_bytecode
        backend = _export.xb.get_backend
    except (ImportError, AttributeError):  # pragma: no cover - a future jax
        yield
        return

    def to_bytecode(module) -> bytes:
        return _jax.mlir.serialize_portable_artifact(module, version, backend().serialize_with_sdy)

    _export._module_to_bytecode = to_bytecode
    try:
        yield
    finally:
        _export._module_to_bytecode = original


def trace_functions(
    functions: Mapping[str, tuple[Callable, Mapping[str, tuple[int, ...]]]],
    variables,
    *,
    activations: Mapping[str, Callable] | None = None,
    params: str = "constants",
):
    """Several `name -> (apply_fn(variables, *inputs), {input name: shape})` as TF concrete functions over one set
    of variables, each named `name` (the converter names the signatures of a multi-function file after them) with
    float32 inputs in the given order. An apply_fn may return a dict of arrays: its keys name the outputs.

    Returns `(holder, [concrete_fn, ...])` in the order of `functions`.
    """
    if params not in ("constants", "arguments"):
        raise ValueError(f"params must be 'constants' or 'arguments', got {params!r}")
    tf = import_tf()
    import jax
    from jax.experimental import jax2tf

    from export.rewrites import activation_overrides
    from zoo.layers.conv import depthwise_impl

    holder = tf.Module()
    convert = partial(jax2tf.convert, with_gradient=False, native_serialization_platforms=("cpu",))
    if params == "arguments":
        holder.params = tf.nest.map_structure(lambda a: tf.Variable(np.asarray(a), trainable=False), variables)
    else:
        consts = jax.tree_util.tree_map(np.asarray, variables)
    tf_functions = []
    for name, (apply_fn, inputs) in functions.items():
        if params == "arguments":
            converted = convert(apply_fn)
            fn = (lambda c: lambda *xs: c(holder.params, *xs))(converted)
        else:
            fn = convert((lambda f: lambda *xs: f(consts, *xs))(apply_fn))
        fn.__name__ = name
        specs = [tf.TensorSpec(tuple(shape), tf.float32, name=k) for k, shape in inputs.items()]
        tf_fn = tf.function(fn, input_signature=specs, autograph=False)
        setattr(holder, f"fn_{len(tf_functions)}", tf_fn)
        tf_functions.append(tf_fn)
    # Everything that is read at trace time must be in effect while the concrete functions are traced.
    with depthwise_impl("tiled"), activation_overrides(activations or {}), \
            stablehlo_target(stablehlo_versions()["target"]):
        concretes = [f.get_concrete_function() for f in tf_functions]
    return holder, concretes
