"""Which parameters a sparsity pass touches: regex rules over parameter paths ("stages_0/block_1/conv_pw/kernel").

    rules = [Rule(r"stages_.*/conv_pw/kernel"), Rule(r"stages_.*/conv_dw/kernel", axis=-1)]
    chosen, skipped = select(flatten(params), rules, n_m=(2, 4))

Without rules the default set is every conv / Dense kernel (last path part `kernel`, 2 or more dimensions) with at
least `min_size` weights. For N:M it leaves out depthwise kernels (HWIO with one input channel per group: the group
axis has size 1) unless `include_depthwise`, which groups them along their channel axis instead, and kernels whose
input-channel axis M does not divide (an RGB stem); both are listed in `skipped` with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

DEFAULT_MIN_SIZE = 1024  # tiny layers (an RGB stem, small SE convs) save little and are the most sensitive


@dataclass(frozen=True)
class Rule:
    """Parameters whose path `re.search`es `pattern`.

    axis: N:M group axis (default -2: the input channels of an HWIO conv kernel or an (in, out) Dense kernel).
    target: this rule's fraction of zeros for unstructured per-layer sparsity (default: the global target).
    """

    pattern: str
    axis: int | None = None
    target: float | None = None

    def compiled(self) -> re.Pattern:
        try:
            return re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"sparsity rule {self.pattern!r} is not a valid regular expression: {e}") from None


@dataclass(frozen=True)
class Selected:
    """One parameter a pass prunes: its path, shape, N:M group axis (non-negative) and per-layer target."""

    path: str
    shape: tuple[int, ...]
    axis: int
    target: float | None = None


def as_rules(rules) -> tuple[Rule, ...] | None:
    """None (the default set), or a tuple of `Rule` from Rules, pattern strings or (pattern, axis) pairs."""
    if rules is None:
        return None
    if isinstance(rules, (str, Rule)):
        rules = [rules]
    out = []
    for r in rules:
        if isinstance(r, Rule):
            out.append(r)
        elif isinstance(r, str):
            out.append(Rule(r))
        elif isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str):
            out.append(Rule(r[0], axis=int(r[1])))
        else:
            raise TypeError(f"a sparsity rule is a regex string, a (regex, axis) pair or a Rule, not {r!r}")
    if not out:
        raise ValueError("empty sparsity rules: pass rules=None for the default set (every large conv/Dense kernel)")
    for r in out:
        r.compiled()
    return tuple(out)


def is_depthwise(shape: Sequence[int]) -> bool:
    """An HWIO kernel with one input channel per group (flax stores depthwise kernels as (kh, kw, 1, C))."""
    return len(shape) == 4 and shape[2] == 1 and shape[3] > 1


def is_kernel(path: str, shape: Sequence[int]) -> bool:
    return path.rsplit("/", 1)[-1] == "kernel" and len(shape) >= 2


def _examples(paths: Sequence[str], k: int = 6) -> str:
    kernels = [p for p in paths if p.endswith("kernel")] or list(paths)
    more = f", ... ({len(paths)} parameters)" if len(kernels) > k else ""
    return ", ".join(kernels[:k]) + more


def select(flat: Mapping[str, object], rules: Sequence[Rule] | None, *, n_m: tuple[int, int] | None = None,
           min_size: int = DEFAULT_MIN_SIZE, include_depthwise: bool = False
           ) -> tuple[list[Selected], list[tuple[str, str]]]:
    """(selected parameters, [(path, why skipped)]) for `flat` {path: array or ShapeDtypeStruct}.

    Raises ValueError, before any work, for a rule that matches nothing (listing real paths), a non-float parameter,
    an axis out of range, or (with `n_m`) an axis that M does not divide.
    """
    shapes = {p: tuple(int(d) for d in np.shape(v)) for p, v in flat.items()}
    chosen: list[Selected] = []
    skipped: list[tuple[str, str]] = []
    if rules is None:
        for path, shape in shapes.items():
            if not is_kernel(path, shape):
                continue
            size = int(np.prod(shape))
            # depthwise kernels have no input-channel groups: their channels (the last axis) form the groups
            axis = len(shape) - (1 if is_depthwise(shape) else 2)
            if size < min_size:
                skipped.append((path, f"{size} weights < min_size {min_size}"))
            elif n_m and is_depthwise(shape) and not include_depthwise:
                skipped.append((path, "depthwise (group axis of size 1); include_depthwise=True groups its channels"))
            elif n_m and shape[axis] % n_m[1]:
                skipped.append((path, f"axis {axis} (size {shape[axis]}) not divisible by M={n_m[1]}"))
            else:
                chosen.append(Selected(path, shape, axis))
        _check_float(flat, chosen)
        return chosen, skipped

    taken: set[str] = set()
    for rule in rules:
        pat = rule.compiled()
        hits = [p for p in shapes if pat.search(p)]
        if not hits:
            raise ValueError(f"sparsity rule {rule.pattern!r} matches no parameter; paths look like: "
                             f"{_examples(list(shapes))}")
        for path in hits:
            if path in taken:  # the first rule that matches a parameter decides its axis and target
                continue
            taken.add(path)
            shape = shapes[path]
            if rule.axis is None and not n_m:  # unstructured: the axis is only reported, any parameter goes
                axis = max(len(shape) - 2, 0)
            else:
                axis = -2 if rule.axis is None else rule.axis
                if not -len(shape) <= axis < len(shape):
                    raise ValueError(f"sparsity rule {rule.pattern!r}: axis {axis} is out of range for {path} of "
                                     f"shape {shape}")
                axis %= len(shape)
            if n_m and shape[axis] % n_m[1]:
                hint = (" (a depthwise kernel: group its channels with axis=-1, or leave it out)" if
                        is_depthwise(shape) else " (choose another axis, or leave it out of the rule's regex)")
                raise ValueError(f"N:M sparsity {n_m[0]}:{n_m[1]}: M={n_m[1]} does not divide axis {axis} (size "
                                 f"{shape[axis]}) of {path} with shape {shape}{hint}")
            chosen.append(Selected(path, shape, axis, rule.target))
    _check_float(flat, chosen)
    return chosen, skipped


def _check_float(flat: Mapping[str, object], chosen: Sequence[Selected]) -> None:
    for s in chosen:
        dtype = np.dtype(getattr(flat[s.path], "dtype", np.float32))
        if not np.issubdtype(dtype, np.floating) and dtype.name != "bfloat16":
            raise ValueError(f"sparsity selects {s.path} of dtype {dtype}; only float parameters can be pruned")
