"""Export-time substitutions: the same function, written with ops the target runs fast.

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

import contextlib
import threading
from typing import Callable, Iterator, Mapping

import jax


def hard_swish_int8_friendly(x):
    """hard_swish(x) = x * relu6(x + 3) / 6, ordered so that the converter keeps it as MUL / ADD+RELU6 / MUL."""
    return (x * (1.0 / 6.0)) * jax.nn.relu6(x + 3.0)


# Applied to full-int8 exports (see the module docstring for the measurement behind each entry).
INT8_ACTIVATIONS: Mapping[str, Callable] = {"hard_swish": hard_swish_int8_friendly}

_LOCK = threading.RLock()


@contextlib.contextmanager
def activation_overrides(overrides: Mapping[str, Callable]) -> Iterator[None]:
    """Trace models with `overrides` (activation name -> function) in place of the registry's definitions.

    Uses `zoo.layers.activations.override_activations` when the zoo provides that hook; otherwise swaps entries of
    the `ACTIVATIONS` table under a lock and restores them on exit.
    """
    from zoo.layers import activations

    if not overrides:
        yield
        return
    hook = getattr(activations, "override_activations", None)
    if hook is not None:
        with hook(overrides):
            yield
        return
    unknown = set(overrides) - set(activations.ACTIVATIONS)
    if unknown:
        raise ValueError(f"cannot override unknown activations {sorted(unknown)}")
    with _LOCK:
        saved = {k: activations.ACTIVATIONS[k] for k in overrides}
        activations.ACTIVATIONS.update(overrides)
        try:
            yield
        finally:
            activations.ACTIVATIONS.update(saved)
