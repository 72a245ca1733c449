"""Quantization-aware training (QAT) for every zoo model without editing model code: int8 per-channel weights, int8
activations, straight-through gradients, activation ranges tracked during training.

    import zoo
    from compress import qat
    from compress.fold_bn import fold_bn

    model = zoo.load("tf_efficientnet_lite0", num_classes=10)
    module, variables = qat.quantize_aware(*fold_bn(model.module, model.variables))
    logits, updates = module.apply(variables, x, train=True, mutable=["quant_stats"])  # ranges tracked
    variables = qat.bake(module, {**variables, **updates})                              # kernels on the int8 grid

Inside the training loop this is the `compress.qat=True` switch (`compress.qat_train`); the trained model exports
with `export.to_tflite(model, quantization="int8", representative_data=...)` to an all-int8 file.

What is simulated, and why this way:
- Weights: every `Conv2d` and `nn.Dense` kernel is fake-quantized per output channel (the last axis; depthwise
  kernels too), symmetric, `scale = max|w| / 127`: the TFLite converter's own rule, so a kernel on this grid is
  re-quantized by the converter without any change. Fold BatchNorm first (`compress.fold_bn`): the converter folds it
  and quantizes the folded kernel, so that is the kernel QAT must see (the BN statistics are frozen in the fold).
- Activations: the input of each of those layers is fake-quantized per tensor, asymmetric int8 on a range that
  contains 0, with a moving average of the batch min/max kept in the `quant_stats` collection (updated only when
  applied with `train=True`). Gradients are straight-through: identity for weights, identity inside the range and
  zero outside it for activations (TF's FakeQuantWithMinMaxVars).
- Evaluation (`train=False`) fake-quantizes the weights only, unless `quantize_activations=True` is passed: the
  deployed int8 graph takes its activation ranges from the converter's calibration, and the exporter traces
  `apply(train=False)`, where round/clip on activations would become float ops between the int8 ones. With the
  weights on the grid (`bake`), the exported graph is the folded float graph and the converter yields all-int8.

Why not Qwix (0.1.8, its `OdmlQatProvider`): it intercepts `jax.lax` convolutions and dot products, so the
shifted-slice depthwise formulation the zoo uses on CPU (`zoo.layers.conv`) escapes it unless training runs the slow
native depthwise; it leaves weights closed over by a jitted function unquantized; and its learned ranges reach a
TFLite file only through its own conversion path (a SavedModel with `quant.fake_quant` composites and the converter's
strict QDQ mode), not `export.to_tflite`. Intercepting the zoo's two weight layers (`flax.linen.intercept_methods`)
covers every model, either depthwise formulation and every jit setting, and ends in the exporter's plain
calibration, which in trial runs gave int8 models as accurate as Qwix's (see FINDINGS).
"""

from __future__ import annotations

import contextvars
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from compress.fold_bn import default_input_shape
from zoo.layers import kinds

STATS = "quant_stats"
_NESTED = contextvars.ContextVar("qat_nested", default=False)  # inside a quantized layer's own call
_RECORD: contextvars.ContextVar[list | None] = contextvars.ContextVar("qat_record", default=None)


def _check_bits(bits, what: str) -> int:
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"{what} must be an int from 2 to 8 (TFLite stores int8), got {bits!r}")
    return int(bits)


def weight_scale(w, bits: int = 8):
    """Per-output-channel (last axis) symmetric scale `max|w| / (2^(bits-1) - 1)`, as the TFLite converter sets it."""
    xp = np if isinstance(w, np.ndarray) else jnp
    return xp.max(xp.abs(w), axis=tuple(range(w.ndim - 1))) / (2 ** (bits - 1) - 1)


def _on_grid(w, bits: int):
    """`w` rounded onto its per-channel grid, in numpy for host arrays and in jax.numpy for traced ones."""
    xp = np if isinstance(w, np.ndarray) else jnp
    qmax = 2 ** (bits - 1) - 1
    scale = weight_scale(w, bits)
    safe = xp.where(scale > 0, scale, 1.0).astype(w.dtype)  # an all-zero channel stays zero
    return xp.clip(xp.round(w / safe), -qmax, qmax) * safe


def fake_quant_weight(w, bits: int = 8):
    """`w` rounded onto its per-channel symmetric grid; the gradient passes straight through.

    A concrete kernel (not traced: the weights an exporter embeds as constants) is rounded on the host, so the graph
    holds the rounded constant: the converter does not fold round/clip on constants, and quantizes a computed kernel
    like an activation (per tensor, with a zero point), which int8 CONV_2D rejects.
    """
    if not isinstance(w, jax.core.Tracer):
        return _on_grid(np.asarray(w, np.float32), bits).astype(np.asarray(w).dtype)
    w32 = w.astype(jnp.float32)
    return (w32 + jax.lax.stop_gradient(_on_grid(w32, bits) - w32)).astype(w.dtype)


def fake_quant_activation(x, lo, hi, bits: int = 8):
    """`x` quantized per tensor, asymmetric, on [lo, hi] widened to contain 0 and nudged so that 0 is exact (as
    TFLite's zero point makes it); clipped straight-through gradient."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    x32 = x.astype(jnp.float32)
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    scale = jnp.maximum((hi - lo) / (qmax - qmin), jnp.finfo(jnp.float32).tiny)
    zero = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)
    xc = jnp.clip(x32, (qmin - zero) * scale, (qmax - zero) * scale)  # zero gradient outside the range
    xq = jnp.round(xc / scale) * scale  # == (q - zero) * scale with q = round(xc / scale) + zero in [qmin, qmax]
    return (xc + jax.lax.stop_gradient(xq - xc)).astype(x.dtype)


def _quantized_layer(module) -> bool:
    return kinds.is_weight_layer(module)


class _QatInterceptor:
    def __init__(self, owner: "QuantAware", train: bool, quantize_activations: bool):
        self.owner, self.train, self.acts = owner, train, quantize_activations
        self.root = owner.scope.path
        self.exclude = re.compile(owner.exclude) if owner.exclude else None

    def _path(self, module) -> str:
        return "/".join(module.path[len(self.root):])

    def __call__(self, next_fun, args, kwargs, ctx):
        m = ctx.module
        if _NESTED.get() or ctx.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if not _quantized_layer(m):
            out = next_fun(*args, **kwargs)
            kinds.check_known(m, "quantization-aware training")  # never leave a weight layer silently float
            return out
        path = self._path(m)
        if self.exclude is not None and self.exclude.search(f"/{path}/"):
            return next_fun(*args, **kwargs)
        if m.is_initializing():
            next_fun(*args, **kwargs)  # creates the kernel (and bias) the quantized call below reads
        record = _RECORD.get()
        if record is not None:
            record.append(path)
        (x,) = args if args else tuple(kwargs.values())
        x = self._activation(m, x)
        params = m.variables["params"]
        qparams = {"kernel": fake_quant_weight(params["kernel"], self.owner.weight_bits)}
        if "bias" in params:  # the layer's own bias, or the shift of a BatchNorm folded into it
            qparams["bias"] = params["bias"]
        # The layer's own code runs on the quantized kernel: a detached copy applied to explicit parameters.
        token = _NESTED.set(True)
        try:
            return m.clone(parent=None, use_bias="bias" in qparams).apply({"params": qparams}, x)
        finally:
            _NESTED.reset(token)

    def _activation(self, m, x):
        # (+inf, -inf): no batch seen yet; the first training batch sets the range, later ones move it by EMA.
        lo_var = m.variable(STATS, "input_min", lambda: jnp.full((), jnp.inf, jnp.float32))
        hi_var = m.variable(STATS, "input_max", lambda: jnp.full((), -jnp.inf, jnp.float32))
        lo, hi = lo_var.value, hi_var.value
        if self.train and not m.is_initializing():
            if not m.is_mutable_collection(STATS):
                raise ValueError(f"training a quantization-aware model updates '{STATS}': apply it with "
                                 f"mutable=['{STATS}', ...] when train=True")
            bmin = jax.lax.stop_gradient(jnp.min(x).astype(jnp.float32))
            bmax = jax.lax.stop_gradient(jnp.max(x).astype(jnp.float32))
            seen, d = lo <= hi, self.owner.ema_decay
            lo = jnp.where(seen, d * lo + (1 - d) * bmin, bmin)
            hi = jnp.where(seen, d * hi + (1 - d) * bmax, bmax)
            lo_var.value, hi_var.value = lo, hi
        if not (self.train or self.acts) or m.is_initializing():
            return x
        return jnp.where(lo <= hi, fake_quant_activation(x, lo, hi, self.owner.activation_bits), x)


class QuantAware(nn.Module):
    """`float_module` with fake-quantized `Conv2d`/`nn.Dense` kernels and inputs (see the module docstring).

    Same parameter names as `float_module`, plus a `quant_stats` collection (`input_min`, `input_max` per layer). Call
    it as `float_module`; `quantize_activations=True` also fake-quantizes activations in evaluation (simulated int8
    inference). (Not named `base` like `BatchNormFolded`'s: nested wrappers sharing one scope need distinct names.)
    """

    float_module: nn.Module
    weight_bits: int = 8
    activation_bits: int = 8
    ema_decay: float = 0.99  # moving average of the activation ranges, per training step
    exclude: str = ""  # regex over "/"-joined layer paths kept in float (e.g. "/attn/")

    def setup(self):
        nn.share_scope(self, self.float_module)

    def __call__(self, *args, train: bool = False, quantize_activations: bool = False, **kwargs):
        with nn.intercept_methods(_QatInterceptor(self, train, quantize_activations)):
            return self.float_module(*args, train=train, **kwargs)


def quantize_aware(module: nn.Module, variables: dict, *, weight_bits: int = 8, activation_bits: int = 8,
                   ema_decay: float = 0.99, exclude: str = "", input_shape=None) -> tuple[QuantAware, dict]:
    """`(module, variables) -> (QuantAware module, variables with an empty-range quant_stats collection)`.

    Pass a BatchNorm-folded model (`compress.fold_bn.fold_bn`) to train what the converter deploys.
    """
    _check_bits(weight_bits, "weight_bits")
    _check_bits(activation_bits, "activation_bits")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
    try:
        re.compile(exclude)
    except re.error as e:
        raise ValueError(f"exclude is not a valid regular expression ({e}): {exclude!r}") from None
    if isinstance(module, QuantAware):
        raise ValueError("this module is already quantization-aware; pass the float module")
    if not isinstance(variables, dict) or "params" not in variables:
        raise TypeError("quantize_aware needs the module's variables: a dict with 'params'")
    qmodule = QuantAware(module, weight_bits, activation_bits, float(ema_decay), exclude)
    return qmodule, {**{k: v for k, v in variables.items() if k != STATS}, STATS: init_stats(qmodule, variables,
                                                                                            input_shape)}


def init_stats(module: QuantAware, variables: dict, input_shape=None) -> dict:
    """The `quant_stats` collection of `module` with every range unobserved."""
    x = jax.ShapeDtypeStruct(tuple(input_shape or default_input_shape(module)), jnp.float32)
    v = {k: val for k, val in variables.items() if k != STATS}
    _, shapes = jax.eval_shape(lambda v, x: module.apply(v, x, train=False, mutable=[STATS]), v, x)
    fill = {"input_min": np.inf, "input_max": -np.inf}
    return jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.full(s.shape, fill[str(getattr(p[-1], "key", p[-1]))], s.dtype), dict(shapes[STATS]))


def quantized_layers(module: QuantAware, variables: dict, input_shape=None) -> tuple[str, ...]:
    """Paths of the layers whose kernels `module` quantizes (traced abstractly)."""
    if not isinstance(module, QuantAware):
        raise TypeError(f"expected a QuantAware module, got {type(module).__name__}")
    record: list[str] = []
    token = _RECORD.set(record)
    try:
        x = jax.ShapeDtypeStruct(tuple(input_shape or default_input_shape(module)), jnp.float32)
        jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x)
    finally:
        _RECORD.reset(token)
    return tuple(dict.fromkeys(record))


def bake(module: QuantAware, variables: dict, input_shape=None) -> dict:
    """The variables with every quantized kernel replaced by its fake-quantized value: on the int8 grid, so the
    model computes the same and the converter's weight quantization is exact."""
    flat = traverse_util.flatten_dict(dict(variables["params"]), sep="/")
    for path in quantized_layers(module, variables, input_shape):
        key = f"{path}/kernel" if path else "kernel"
        flat[key] = jax.device_put(fake_quant_weight(np.asarray(flat[key]), module.weight_bits))
    return {**variables, "params": traverse_util.unflatten_dict(flat, sep="/")}


def grid_error(w, bits: int = 8) -> float:
    """Largest distance of `w / scale` from an integer (0 for a kernel on its per-channel grid, up to 0.5 else)."""
    w = np.asarray(w, np.float64)
    scale = weight_scale(w, bits)
    q = w / np.where(scale > 0, scale, 1.0)
    return float(np.max(np.abs(q - np.round(q))))
