"""Export-time rewrite for full int8: carry a residual stream's first row as its own tensor, so it gets its own scale.

Why: int8 gives each activation tensor one scale. In MobileNetV2 with its ImageNet weights, the residual stream of
stage 5 (7x7x160 at 224x224) reaches 34.5 at an RMS of 0.75, and every large value lies in its first row: rows 1-6
stay within 3.4 (the stride-2 convolutions pad the top and left border, the bottom and right not). One scale for the
whole tensor spends 8 bits on the border and rounds the other 42 positions coarsely. Carried as two tensors, first
row and other rows, each gets the range it needs: the other rows' range drops from +-34 to +-2.7.

How: inside the chosen stages (a regex over module paths, e.g. "stages_5/"), the output of each block's projection
(a 1x1 convolution) is computed on the two bands separately and stays split through BatchNorm, activations, the
residual ADD and the next block's 1x1 expansion; a spatial op (the depthwise convolution, pooling, anything that is
not per position) gets the bands joined again by a CONCATENATION of ReLU6 outputs, whose ranges agree. The result
is the same function (float results differ by rounding only; the export's own verification checks it), traced as
SLICE, CONV_2D, ADD and CONCATENATION ops that XNNPACK runs in int8, in one partition.

Measured on MobileNetV2 (`tests/test_export_models.py`'s first 64 photo crops, percentile ranges): logits SQNR 20.3 ->
22.1 dB (top-1 agreement with JAX 89.1% -> 96.9% on those 64), 17 more small ops, no float island. On all 256 crops
of that test, 91.4-94.1% over three calibration sets (22.1-22.4 dB): below 95%.
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np


class RowBands:
    """An NHWC map held as two tensors: its first row (`top`, 1 x W) and the other rows (`rest`)."""

    def __init__(self, top, rest):
        self.top, self.rest = top, rest

    @property
    def shape(self) -> tuple[int, ...]:
        n, _, w, c = self.top.shape
        return (n, 1 + self.rest.shape[1], w, c)

    @property
    def ndim(self) -> int:
        return 4

    def map(self, fn: Callable) -> RowBands:
        """A per-position function applied to each band."""
        return RowBands(fn(self.top), fn(self.rest))

    def joined(self):
        return jnp.concatenate([self.top, self.rest], axis=1)

    def __add__(self, other):
        if isinstance(other, RowBands):
            return RowBands(self.top + other.top, self.rest + other.rest)
        return self.joined() + other

    __radd__ = __add__


def split_rows(x) -> RowBands:
    if x.ndim != 4 or x.shape[1] < 2:
        raise ValueError(f"row split needs an NHWC map with at least 2 rows, got shape {tuple(x.shape)}")
    return RowBands(x[:, :1], x[:, 1:])


def _pointwise(module, x):
    """`module` (a 1x1 stride-1 Conv2d or an inference-mode BatchNorm) on x, from its variables: the module's own
    call may run only once per trace (it would create its parameters a second time)."""
    from zoo.layers import kinds

    params = module.variables["params"]
    if kinds.is_folding_norm(module):
        stats = module.variables["batch_stats"]
        scale = params["scale"] / jnp.sqrt(stats["var"] + module.epsilon)
        return (x - stats["mean"]) * scale + params["bias"]
    y = jax.lax.conv_general_dilated(x, params["kernel"].astype(x.dtype), (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + params["bias"] if "bias" in params else y


def _is_pointwise(module) -> bool:
    from zoo.layers import kinds

    if kinds.is_folding_norm(module):
        return bool(module.use_running_average)  # training-mode statistics need the whole map: joined instead
    return (kinds.is_pointwise(module) and "kernel" in module.variables.get("params", {})
            and tuple(np.shape(module.variables["params"]["kernel"])[:2]) == (1, 1))


class _Interceptor:
    """Splits the projections of blocks under `pattern`; keeps the bands apart through per-position modules."""

    def __init__(self, pattern: re.Pattern):
        self.pattern = pattern
        self.split: list[str] = []

    def __call__(self, next_fn, args, kwargs, context):
        from zoo.layers.blocks import InvertedResidual, Stage

        module = context.module
        if context.method_name != "__call__" or not args:
            return next_fn(*args, **kwargs)
        x, path = args[0], "/".join(module.path)
        if isinstance(x, RowBands):
            if isinstance(module, (Stage, InvertedResidual)):  # containers hand the bands on to their parts
                return next_fn(*args, **kwargs)
            if _is_pointwise(module):
                return x.map(lambda t: _pointwise(module, t))
            return next_fn(x.joined(), *args[1:], **kwargs)  # spatial or unknown: the whole map again
        if module.name == "conv_pwl" and self.pattern.search(path + "/") and _is_pointwise(module):
            self.split.append(path)
            return split_rows(x).map(lambda t: _pointwise(module, t))
        return next_fn(*args, **kwargs)


def row_aware(activations: Mapping[str, Callable]) -> dict[str, Callable]:
    """Activation overrides that apply each function band by band to a `RowBands` (they act per position)."""
    def wrap(fn):
        return lambda x: x.map(fn) if isinstance(x, RowBands) else fn(x)

    return {name: wrap(fn) for name, fn in activations.items()}


# "auto" splits a stage when its stream's first row reaches this many times the other rows' largest magnitude: the
# other rows then get an int8 step at least this much finer (MobileNetV2 stage 5: 8.8x; stage 4: 1.4x, not split).
AUTO_RATIO = 3.0
AUTO_INPUTS = 32  # calibration inputs the "auto" choice looks at


def border_heavy_stages(module, variables, data, ratio: float = AUTO_RATIO) -> str | None:
    """The pattern "auto" resolves to: the stages whose residual stream (their inverted-residual blocks' outputs) has
    a first row at least `ratio` times larger in magnitude than its other rows on `data`, or None when no stage has."""
    from zoo.layers.blocks import InvertedResidual

    def run(v, x):
        _, state = module.apply(v, x, capture_intermediates=lambda m, name: isinstance(m, InvertedResidual)
                                and name == "__call__", mutable=["intermediates"])
        return state.get("intermediates", {})  # none: no inverted-residual block

    run = jax.jit(run)
    x = jnp.asarray(data[:AUTO_INPUTS])
    if not jax.tree_util.tree_leaves(run.eval_shape(variables, x)):
        return None  # no inverted-residual block: known from the trace, without compiling or running the model
    captured = run(variables, x)
    top: dict[str, float] = {}
    rest: dict[str, float] = {}
    for path, y in jax.tree_util.tree_flatten_with_path(captured)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        block = keys.index("__call__") if "__call__" in keys else len(keys)
        if block < 2 or y.ndim != 4 or y.shape[1] < 2:
            continue
        stage = "/".join(keys[:block - 1])
        a = np.abs(np.asarray(y))
        top[stage] = max(top.get(stage, 0.0), float(a[:, 0].max()))
        rest[stage] = max(rest.get(stage, 0.0), float(a[:, 1:].max()))
    chosen = [s for s in top if top[s] >= ratio * max(rest[s], 1e-12)]
    return "|".join(re.escape(s) + "/" for s in chosen) or None


def check_pattern(pattern) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"int8_split_top_row takes a regex over module paths (e.g. 'stages_5/'), got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"int8_split_top_row {pattern!r} is not a valid regex: {e}") from None


def split_apply(apply_fn: Callable, pattern: str, activations: Mapping[str, Callable] | None):
    """`(apply_fn', activations')`: `apply_fn(variables, x)` traced with the top-row split of the blocks whose module
    path matches `pattern`, and the activation overrides that keep the bands apart. Tracing raises ValueError when no
    block's projection matched the pattern."""
    from zoo.layers.activations import ACTIVATIONS

    compiled = check_pattern(pattern)

    def traced(variables, x):
        import flax.linen as nn

        interceptor = _Interceptor(compiled)
        with nn.intercept_methods(interceptor):
            y = apply_fn(variables, x)
        if not interceptor.split:
            raise ValueError(f"int8_split_top_row={pattern!r} matched no block projection (a 1x1 'conv_pwl' of a "
                             "MobileNet-style inverted residual block); name stages as in the model's module paths, "
                             "e.g. 'stages_5/'")
        return y

    return traced, row_aware({**ACTIVATIONS, **(activations or {})})


@contextlib.contextmanager
def split_top_row(pattern: str):
    """Run a model (in JAX) with the rewrite, e.g. to check that it computes the same function:

        with split_top_row("stages_5/"):
            y = module.apply(variables, x)
    """
    import flax.linen as nn

    from zoo.layers.activations import ACTIVATIONS, override_activations

    with nn.intercept_methods(_Interceptor(check_pattern(pattern))), override_activations(row_aware(ACTIVATIONS)):
        yield
