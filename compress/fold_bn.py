"""BatchNorm folding as a pure pass `(module, variables) -> (module, variables)`, and a numerics check for such passes.

Every inference BatchNorm that directly follows a convolution is an affine map per output channel, so it folds into
that convolution: `kernel' = kernel * s`, `bias' = (bias - mean) * s + beta` with `s = gamma / sqrt(var + eps)`. The
TFLite converter does the same when it exports, and then quantizes the folded kernel; quantization-aware training has
to see that kernel too (`compress.qat`), which is why folding exists as a pass of its own.

    import zoo
    from compress.fold_bn import checked, fold_bn

    model = zoo.load("mobilenetv3_large_100")
    module, variables = fold_bn(model.module, model.variables)                # no BatchNorm parameters left
    module, variables = checked(fold_bn, x)(model.module, model.variables)    # same, and the outputs compared on x

No model code changes: the pairs are found by tracing the model once (abstractly) and recording which BatchNorm call
receives a `Conv2d` call's output unchanged; the folded model is the same module wrapped in `BatchNormFolded`, which
shares its parameter scope (same names, no extra level) and, through `flax.linen.intercept_methods`, turns the folded
BatchNorms into the identity and adds each folded convolution's bias. This assumes the convolution's output feeds only
its BatchNorm - true of every zoo family, and what `checked` verifies numerically.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from zoo.abstract import structure_trace
from zoo.layers import kinds

Pass = Callable[[nn.Module, dict], tuple[nn.Module, dict]]
_WRAPPED_FIELDS = ("base", "float_module")  # what BatchNormFolded and compress.qat.QuantAware wrap


class FoldError(ValueError):
    """A pass changed the model's outputs beyond the tolerance, or a model cannot be folded as asked."""


class _Recorder:
    """Interceptor that records (conv path, BatchNorm path, BatchNorm module) for BatchNorms fed by a conv output."""

    def __init__(self):
        self.conv_outputs: list[tuple[object, tuple[str, ...]]] = []  # outputs kept alive, so `is` stays meaningful
        self.pairs: list[tuple[tuple[str, ...], tuple[str, ...], nn.BatchNorm]] = []

    def __call__(self, next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        if ctx.method_name != "__call__":
            return out
        kinds.check_known(ctx.module, "BatchNorm folding")
        if kinds.is_weight_layer(ctx.module):
            self.conv_outputs.append((out, ctx.module.path))
        elif kinds.is_folding_norm(ctx.module):
            x = args[0] if args else kwargs.get("x")
            for y, conv_path in reversed(self.conv_outputs):
                if y is x:
                    self.pairs.append((conv_path, ctx.module.path, ctx.module))
                    break
        return out


def default_input_shape(module: nn.Module) -> tuple[int, int, int, int]:
    """A small input that every zoo model accepts (wrappers looked through); only the graph's structure matters."""
    while not hasattr(module, "in_chans"):
        inner = next((getattr(module, f) for f in _WRAPPED_FIELDS if isinstance(getattr(module, f, None), nn.Module)),
                     None)
        if inner is None:
            break
        module = inner
    return (1, 64, 64, int(getattr(module, "in_chans", 3)))


def find_conv_bn_pairs(module: nn.Module, variables: dict | None = None, input_shape=None
                       ) -> tuple[tuple[str, str, float], ...]:
    """`(weight layer path, BatchNorm path, epsilon)` for every folding norm applied directly to a weight layer's output
    (conv or dense: `zoo.layers.kinds`); a parameter-holding layer of unknown kind raises `UnknownLayerKindError`.

    Traces `module` abstractly (no compilation) on `input_shape` (default: 64x64); `variables` may be None.
    """
    if isinstance(module, BatchNormFolded):
        raise FoldError("this module is already BatchNorm-folded; fold the original module instead")
    shape = tuple(input_shape or default_input_shape(module))
    rec = _Recorder()
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    with nn.intercept_methods(rec), structure_trace():
        if variables is None:
            jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)
        else:
            jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x)
    out = []
    for conv_path, bn_path, bn in rec.pairs:
        if bn.axis not in (-1, len(shape) - 1):
            raise FoldError(f"{'/'.join(bn_path)}: BatchNorm over axis {bn.axis}; only the channel axis folds")
        out.append(("/".join(conv_path), "/".join(bn_path), float(bn.epsilon)))
    return tuple(out)


class _FoldInterceptor:
    def __init__(self, folds: tuple[tuple[str, str, float], ...], root: tuple[str, ...]):
        self.convs = {c for c, _, _ in folds}
        self.bns = {b for _, b, _ in folds}
        self.root = root

    def _path(self, module) -> str:
        return "/".join(module.path[len(self.root):])

    def __call__(self, next_fun, args, kwargs, ctx):
        if ctx.method_name != "__call__":
            return next_fun(*args, **kwargs)
        m = ctx.module
        if kinds.is_folding_norm(m) and self._path(m) in self.bns:
            return args[0] if args else kwargs["x"]  # folded into the preceding conv; statistics frozen there
        if kinds.is_weight_layer(m) and self._path(m) in self.convs:
            y = next_fun(*args, **kwargs)
            if not m.use_bias:  # the folded BatchNorm's shift lives in the conv's scope as an ordinary bias
                y = y + m.param("bias", nn.initializers.zeros, (m.features,)).astype(y.dtype)
            return y
        return next_fun(*args, **kwargs)


class BatchNormFolded(nn.Module):
    """`base` with the BatchNorms listed in `folds` folded into their convolutions (see the module docstring).

    Same call signature and parameter names as `base`; the folded BatchNorms have no variables and the folded
    convolutions have a `bias`. (Wrappers name their wrapped module `base`: nested wrappers that share one scope need
    distinct field names.)
    """

    base: nn.Module
    folds: tuple[tuple[str, str, float], ...]  # (conv path, BatchNorm path, epsilon), as `find_conv_bn_pairs`

    def setup(self):
        nn.share_scope(self, self.base)

    def __call__(self, *args, **kwargs):
        with nn.intercept_methods(_FoldInterceptor(self.folds, self.scope.path)):
            return self.base(*args, **kwargs)


def folded_module(module: nn.Module, input_shape=None) -> BatchNormFolded:
    """The folded module alone (to rebuild a folded model whose variables come from a checkpoint)."""
    return BatchNormFolded(module, find_conv_bn_pairs(module, None, input_shape))


def fold_variables(variables: dict, folds) -> dict:
    """The variables with each listed BatchNorm folded into its conv's kernel and bias (float64 on the host)."""
    flat = {k: v for k, v in traverse_util.flatten_dict(dict(variables), sep="/").items()}
    out = dict(flat)
    for conv, bn, eps in folds:
        try:
            kernel = np.asarray(flat[f"params/{conv}/kernel"])
            mean = np.asarray(flat[f"batch_stats/{bn}/mean"], np.float64)
            var = np.asarray(flat[f"batch_stats/{bn}/var"], np.float64)
        except KeyError as e:
            raise FoldError(f"variables lack {e.args[0]} needed to fold {bn} into {conv}; pass the variables of "
                            "this module (with batch_stats)") from None
        gamma = np.asarray(flat.get(f"params/{bn}/scale", np.ones_like(mean)), np.float64)
        beta = np.asarray(flat.get(f"params/{bn}/bias", np.zeros_like(mean)), np.float64)
        bias = np.asarray(flat.get(f"params/{conv}/bias", np.zeros_like(mean)), np.float64)
        s = gamma / np.sqrt(var + eps)
        out[f"params/{conv}/kernel"] = jax.device_put((kernel.astype(np.float64) * s).astype(kernel.dtype))
        out[f"params/{conv}/bias"] = jax.device_put(((bias - mean) * s + beta).astype(kernel.dtype))
        for key in (f"params/{bn}/scale", f"params/{bn}/bias", f"batch_stats/{bn}/mean", f"batch_stats/{bn}/var"):
            out.pop(key, None)
    tree = traverse_util.unflatten_dict(out, sep="/")
    return {k: v for k, v in tree.items() if k == "params" or v}  # a collection left empty is dropped


def unfold_variables(variables: dict, folded: dict, folds) -> dict:
    """The inverse of `fold_variables` for the module's own structure: `variables` (with BatchNorms) whose folded
    convolutions compute what `folded` says (e.g. after a pass edited folded kernels and biases).

    Each listed BatchNorm becomes an identity with the folded shift: mean 0, variance 1 - eps, scale 1, bias = the
    folded bias; the conv gets the folded kernel (and a zero bias of its own). Folding this again - as the converter
    does - gives back the folded kernel up to a per-channel factor of 1 +- 1 ulp, which keeps an int8 grid.
    """
    flat = traverse_util.flatten_dict(dict(variables), sep="/")
    new = traverse_util.flatten_dict(dict(folded), sep="/")
    out = dict(flat)
    for key, value in new.items():
        if key in out:
            out[key] = value
    for conv, bn, eps in folds:
        kernel, bias = new[f"params/{conv}/kernel"], np.asarray(new[f"params/{conv}/bias"])
        if f"params/{bn}/bias" not in flat:
            raise FoldError(f"{bn} has no bias parameter to carry the folded shift of {conv}")
        out[f"params/{conv}/kernel"] = kernel
        if f"params/{conv}/bias" in flat:
            out[f"params/{conv}/bias"] = np.zeros_like(bias)
        if f"params/{bn}/scale" in flat:
            out[f"params/{bn}/scale"] = np.ones_like(bias)
        out[f"params/{bn}/bias"] = bias
        out[f"batch_stats/{bn}/mean"] = np.zeros_like(bias)
        out[f"batch_stats/{bn}/var"] = np.full_like(bias, 1.0 - eps)
    return jax.device_put(traverse_util.unflatten_dict(out, sep="/"))  # host arrays placed in one transfer


def fold_bn(module: nn.Module, variables: dict, *, input_shape=None) -> tuple[BatchNormFolded, dict]:
    """Fold every BatchNorm that follows a convolution: `(module, variables) -> (folded module, folded variables)`.

    The result computes what `module.apply(variables, x, train=False)` computes (to float rounding), with the
    BatchNorm statistics frozen into the convolutions, also when applied with `train=True`.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fold_bn takes a linen module and its variables, got {type(module).__name__}")
    if not isinstance(variables, dict) or "params" not in variables:
        raise TypeError("fold_bn needs the module's variables: a dict with 'params' (and 'batch_stats')")
    folds = find_conv_bn_pairs(module, None, input_shape)  # structure only; fold_variables checks the variables
    return BatchNormFolded(module, folds), fold_variables(variables, folds)


def checked(pass_fn: Pass, inputs, *, atol: float = 1e-4, rtol: float = 1e-4, **apply_kwargs) -> Pass:
    """`pass_fn` as a pass that also checks its result: both models run on `inputs` (eval mode) and the outputs must
    agree within `atol + rtol * max|original|`, else `FoldError` names the largest difference.

        module, variables = checked(fold_bn, x, atol=1e-4)(module, variables)
    """
    x = jnp.asarray(inputs)

    def run(module: nn.Module, variables: dict) -> tuple[nn.Module, dict]:
        new_module, new_variables = pass_fn(module, variables)
        run_one = lambda m, v: np.asarray(jax.jit(lambda v, x: m.apply(v, x, train=False, **apply_kwargs))(v, x),
                                          np.float64)  # noqa: E731 - jitted: eager linen applies dispatch op by op
        ref, got = run_one(module, variables), run_one(new_module, new_variables)
        if ref.shape != got.shape:
            raise FoldError(f"{getattr(pass_fn, '__name__', 'pass')} changed the output shape {ref.shape} -> "
                            f"{got.shape}")
        err, bound = float(np.max(np.abs(ref - got))), atol + rtol * float(np.max(np.abs(ref)))
        if not err <= bound:
            raise FoldError(f"{getattr(pass_fn, '__name__', 'pass')} changed the outputs by up to {err:.3g} "
                            f"(allowed {bound:.3g}); the pass does not preserve this model's numerics")
        return new_module, new_variables

    return run
