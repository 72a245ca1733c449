"""Activation equalization: a post-training pass that rescales channels across `conv -> BN -> ReLU/ReLU6 -> conv`
so that every channel of the activation tensor between them spans its per-tensor int8 range.

    import zoo
    from compress.equalize import equalize_activations

    model = zoo.load("mobilenet_v2")
    module, variables = equalize_activations(model.module, model.variables, model.preprocess(images))

Why: TFLite quantizes activations per tensor, so one int8 step serves every channel of a tensor. In MobileNetV2 the
ReLU6 outputs inside each block reach 6 in a few channels and a fraction of that in most, so most channels are
rounded to a handful of levels. Per-channel activation ranges would fix it, but int8 kernels take one scale per
tensor; this pass gets part of the way by moving a per-channel scale `s` from the consumer into the producer (Nagel et
al., "Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV 2019, cross-layer equalization):

    act(s * y) / s == act(y)    for ReLU always, for ReLU6 while s * y <= 6

The producer BatchNorm's scale and shift are multiplied by `s` (a per-output-channel change, which per-channel int8
weights absorb exactly) and the consumer's kernel divided by `s` along its input channels:
- a depthwise consumer has per-channel int8 weights too, so the move is free: `s = 6 / max` for ReLU6 (for ReLU,
  the largest channel maximum over the channel's), capped at `max_scale`;
- a dense consumer (a 1x1 projection) keeps one int8 scale per output channel over all its input rows, so a shrunk
  row loses precision; there the scale is `(range ratio) ** dense_strength`, a compromise.

Measured on real-weight MobileNetV2 (full-int8 TFLite, percentile ranges, bias correction, the export test's 32
calibration and 64 verification crops): logit SQNR 18.7 -> 20.3 dB (top-1 agreement 87.5% -> 89.1%); random-weight
MobileNetV3-Large (ReLU in its first blocks) 10.7 -> 12.3 dB. EfficientNet-Lite0, whose ReLU6 channels mostly
saturate already, is unchanged (22.6 / 22.5 dB). Residual streams (the linear bottleneck outputs summed across a
stage) are left alone: moving scales there costs the 1x1 consumers more weight precision than it saves (measured:
+0.3 dB on MobileNetV2, -0.7 dB on EfficientNet-Lite0).

The channel maxima come from the calibration data. A scaled ReLU6 channel saturates at its calibrated maximum, the
clipping a per-channel int8 range would apply anyway, so on the calibration data the model is unchanged, which the
pass checks. Pairs are found by tracing the model once on two inputs: a conv whose input is exactly ReLU6 (or ReLU)
of the output of the BatchNorm called just before it. If the activation also feeds something else (a residual), the
move would change the model; the check finds and drops such a pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from zoo.layers import kinds

RELU6 = 6.0
DEFAULT_MAX_SCALE = 16.0
DEFAULT_DENSE_STRENGTH = 0.5
_PROBE = 2  # images traced to find the pairs
_SEARCH = 2  # images on which the moves that break the model are searched for


@dataclass(frozen=True)
class Pair:
    norm: str  # the producer BatchNorm's parameter path
    conv: str  # the consumer Conv2d's parameter path
    depthwise: bool
    bound: float | None  # 6.0 for ReLU6, None for ReLU


def _path(module) -> str:
    return "/".join(module.path)


def _is_conv(module: nn.Module) -> bool:
    """A weight layer with spatial taps (HWIO kernel): the consumers whose input channels this pass scales."""
    return kinds.is_weight_layer(module) and bool(kinds.kind_of(module).spatial_axes)


class _Observer:
    """One compiled forward pass (compiled once per batch size) that gives the logits, every BatchNorm and Conv2d call
    on the batch's first `_PROBE` inputs in the order calls return ((path, module) in `calls`, then (first argument,
    output) arrays), and the per-channel maximum of every BatchNorm's output over the batch. Under jit: eager dispatch
    of a whole model costs 10+ s on CPU."""

    def __init__(self, module: nn.Module):
        self.calls: list[tuple[str, nn.Module]] = []

        def run(v, xb):
            self.calls.clear()
            arrays, maxima = [], {}

            def record(next_fun, args, kwargs, ctx):
                out = next_fun(*args, **kwargs)
                if ctx.method_name != "__call__":
                    return out
                kinds.check_known(ctx.module, "activation equalization")
                norm = kinds.is_folding_norm(ctx.module)
                if norm or _is_conv(ctx.module):
                    self.calls.append((_path(ctx.module), ctx.module))
                    arrays.append(((args[0] if args else next(iter(kwargs.values())))[:_PROBE], out[:_PROBE]))
                if norm:
                    maxima[_path(ctx.module)] = jnp.max(out, axis=tuple(range(out.ndim - 1)))
                return out

            with nn.intercept_methods(record):
                logits = module.apply(v, xb, train=False)
            return logits, arrays, maxima

        self.run = jax.jit(run)

    def probe_calls(self, variables: dict, probe) -> list[tuple[str, nn.Module, np.ndarray, np.ndarray]]:
        _, arrays, _ = jax.device_get(self.run(variables, np.asarray(probe, np.float32)))
        return [(path, mod, np.asarray(x), np.asarray(out)) for (path, mod), (x, out) in zip(self.calls, arrays)]


def _close(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool(np.allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(b).max())), rtol=0))


def find_pairs(module: nn.Module, variables: dict, probe) -> tuple[Pair, ...]:
    """Every (BatchNorm, Conv2d) where the conv's input equals ReLU6 (or ReLU) of that BatchNorm's output on `probe`
    and the BatchNorm is the one called just before the conv. Where ReLU and ReLU6 agree on the probe (nothing above
    6), ReLU6 is assumed: its scales are valid for both."""
    return _pairs(_Observer(module).probe_calls(variables, probe))


def _pairs(calls) -> tuple[Pair, ...]:
    counts: dict[str, int] = {}
    for path, *_ in calls:
        counts[path] = counts.get(path, 0) + 1
    pairs, last_norm = [], None
    for path, mod, arr, out in calls:
        if kinds.is_folding_norm(mod):
            last_norm = (path, np.asarray(out))
            continue
        if not _is_conv(mod):
            continue
        if last_norm is None or counts[path] > 1 or counts[last_norm[0]] > 1:
            continue
        y, x = last_norm[1], np.asarray(arr)
        if x.shape != y.shape:
            continue
        if _close(x, np.clip(y, 0.0, RELU6)):
            bound = RELU6
        elif _close(x, np.maximum(y, 0.0)):
            bound = None
        else:
            continue
        depthwise = kinds.is_depthwise(mod, x.shape[-1])
        if mod.groups > 1 and not depthwise:
            continue  # grouped convs mix the scaled channels within groups: not handled
        pairs.append(Pair(last_norm[0], path, depthwise, bound))
    return tuple(pairs)


def channel_maxima(module: nn.Module, variables: dict, data: np.ndarray, norms, batch_size: int = 32
                   ) -> dict[str, np.ndarray]:
    """Per-channel maxima over `data` of the outputs of the BatchNorms at paths `norms`."""
    return _maxima(_Observer(module), variables, np.asarray(data, np.float32), norms, batch_size)[0]


def _maxima(observer: _Observer, variables: dict, x: np.ndarray, norms, batch_size: int):
    """(maxima of the `norms` (None: of every BatchNorm), logits, the first batch's probe calls) in one pass over
    `x`."""
    out: dict[str, np.ndarray] = {}
    logits, calls = [], None
    for i in range(0, len(x), batch_size):
        y, arrays, maxima = jax.device_get(observer.run(variables, x[i:i + batch_size]))
        logits.append(np.asarray(y))
        if calls is None:
            calls = [(p, m, np.asarray(a), np.asarray(o)) for (p, m), (a, o) in zip(observer.calls, arrays)]
        for k in maxima if norms is None else norms:
            out[k] = np.maximum(out[k], maxima[k]) if k in out else np.asarray(maxima[k])
    return out, np.concatenate(logits), calls


def pair_scales(pair: Pair, maxima: np.ndarray, *, max_scale: float = DEFAULT_MAX_SCALE,
                dense_strength: float = DEFAULT_DENSE_STRENGTH) -> np.ndarray:
    """Per-channel scales (>= 1) for one pair from the producer BatchNorm's per-channel output maxima: each channel
    brought up to the tensor's reach (6 for ReLU6, the largest channel maximum for ReLU), to the power
    `dense_strength` for a dense consumer, capped at `max_scale`; channels that reach ReLU6's bound, or never turn
    positive, keep 1."""
    mx = np.asarray(maxima, np.float64)
    live = mx > 0
    reach = np.minimum(mx, pair.bound) if pair.bound is not None else mx
    target = pair.bound if pair.bound is not None else float(reach.max(initial=0.0))
    ratio = np.where(live, target / np.where(live, reach, 1.0), 1.0)
    if not pair.depthwise:
        ratio = ratio ** dense_strength
    s = np.clip(ratio, 1.0, max_scale)
    if pair.bound is not None:
        s = np.where(mx >= pair.bound, 1.0, s)  # a saturating channel cannot move: its clip would shift
    return s


def _apply(flat: dict, moves) -> dict:
    """`flat` params with each (pair, scales) move applied: the producer BatchNorm's scale and shift times `s`, the
    consumer's kernel divided by `s` along its input channels."""
    new = dict(flat)
    for pair, s in moves:
        for name in ("scale", "bias"):
            key = f"{pair.norm}/{name}"
            new[key] = (new[key] * s).astype(new[key].dtype)
        key = f"{pair.conv}/kernel"
        k = new[key]
        # HWIO kernels: a depthwise one (I == 1) carries the channel on its last axis, a dense one on its input axis
        shape = (1,) * (k.ndim - 1) + (-1,) if pair.depthwise else (1,) * (k.ndim - 2) + (-1, 1)
        new[key] = (k / s.reshape(shape)).astype(k.dtype)
    return new


def equalize_activations(module: nn.Module, variables: dict, data, *, max_scale: float = DEFAULT_MAX_SCALE,
                         dense_strength: float = DEFAULT_DENSE_STRENGTH, batch_size: int = 32,
                         rtol: float = 1e-4) -> tuple[nn.Module, dict]:
    """`(module, variables, calibration inputs) -> (module, variables)`: the same module, with per-channel scales
    moved from each ReLU/ReLU6 consumer conv into the BatchNorm before the activation (see the module doc).

    data: float NHWC inputs, preprocessed like the model's (the calibration set of an int8 export).
    The outputs on `data` are checked to stay within `rtol` (relative to the largest output) of the original's; a
    pair whose move breaks that (its activation also feeds something else) is left out.
    """
    if not isinstance(variables, dict) or not variables.get("batch_stats"):
        raise TypeError("activation equalization needs a model with BatchNorm (variables with 'batch_stats'); fold "
                        "BatchNorm after this pass, not before")
    if max_scale < 1.0 or not 0.0 <= dense_strength <= 1.0:
        raise ValueError(f"need max_scale >= 1 and 0 <= dense_strength <= 1, got {max_scale}, {dense_strength}")
    x = np.asarray(data, np.float32)
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"activation equalization needs a non-empty float NHWC batch of calibration inputs, got "
                         f"shape {x.shape}")
    observer = _Observer(module)
    # every BatchNorm's maxima, the logits and the pairs from one pass over the data (the probe is its first inputs)
    maxima, ref, calls = _maxima(observer, variables, x, None, batch_size)
    pairs = _pairs(calls)
    if not pairs:
        return module, variables
    moves = [(p, pair_scales(p, maxima[p.norm], max_scale=max_scale, dense_strength=dense_strength)) for p in pairs]
    flat = traverse_util.flatten_dict(jax.device_get(dict(variables["params"])), sep="/")

    def with_moves(chosen) -> dict:
        params = jax.device_put(traverse_util.unflatten_dict(_apply(flat, chosen), sep="/"))
        return {**variables, "params": params}

    def outputs(v, xs) -> np.ndarray:  # the observer's pass, compiled for this batch size already
        return np.concatenate([np.asarray(observer.run(v, xs[i:i + batch_size])[0])
                               for i in range(0, len(xs), batch_size)])

    bound = rtol * max(1.0, float(np.abs(ref).max()))

    def keeps_outputs(chosen) -> bool:
        """Whether the model with the moves `chosen` gives the original's outputs on all of `x`."""
        return bool(np.max(np.abs(outputs(with_moves(chosen), x) - ref)) <= bound)

    # The search runs the plain forward (no observed outputs) on `_SEARCH` inputs: a pass of a few milliseconds of
    # arithmetic, where the observer's on a whole batch costs ~0.5 s (FBNet-C at 128x128: 25 s of search -> 5 s).
    forward = jax.jit(lambda v, xb: module.apply(v, xb, train=False))
    probe = x[:_SEARCH]
    probe_ref: list[np.ndarray] = []  # computed when a search starts

    def keeps_probe(chosen) -> bool:
        if not probe_ref:
            probe_ref.append(np.asarray(forward(variables, probe)))
        return bool(np.max(np.abs(np.asarray(forward(with_moves(chosen), probe)) - probe_ref[0])) <= bound)

    def acceptable(chosen) -> list:
        """The moves of `chosen` that keep the outputs, found by halving on a few inputs (a move that breaks the
        model, its activation read elsewhere, breaks it on any input): a passing group is kept whole, a failing one
        split, so k breaking moves among n cost ~2k log2(n) small passes instead of n full ones."""
        if keeps_probe(chosen):
            return list(chosen)
        if len(chosen) == 1:
            return []
        half = len(chosen) // 2
        return acceptable(chosen[:half]) + acceptable(chosen[half:])

    if not keeps_outputs(moves):
        kept = acceptable(moves)
        # what passed on a few inputs or in separate groups but not on all data together: judge each move alone
        moves = kept if keeps_outputs(kept) else [m for m in kept if keeps_outputs([m])]
    return module, with_moves(moves)
