"""Weight sparsity: unstructured magnitude pruning (global or per layer) and N:M (2:4), as pure pytree passes and a
train-loop hook whose masks live in the train state.

    import train, zoo
    from compress.sparsity import Sparsifier, format_sparsity_report, sparsity_report

    model = zoo.load("tf_efficientnet_lite0", num_classes=10)
    sp = Sparsifier("2:4")                                   # or Sparsifier(0.8, schedule="polynomial", end_step=900)
    result = train.fit(cfg, model=model, hooks=[sp.hook], compression=sp.init(model.variables["params"]))
    print(format_sparsity_report(sparsity_report(result.model.variables["params"])))

    pruned = sp.apply(model.variables["params"])            # one-shot, outside training

The compression state is `{"sparsity": {"step": int32, "masks": {...bool masks, nested like params...}}}` (the key is
`Sparsifier.key`, so it merges with other compression state). `step` counts the hook's calls, i.e. optimizer updates:
the loop does not pass its step to hooks. After every update the hook recomputes the masks when the schedule says so,
then zeroes the pruned weights; pruned weights never grow back (masks are recomputed from the masked weights).

Schedules: "oneshot" prunes to the target at `begin_step` (at `init` when it is 0); "polynomial" is Zhu & Gupta 2017
("To prune, or not to prune", arXiv:1710.01878, eq. 1): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (end - t0))^3, masks
recomputed every `frequency` updates from `begin_step` to `end_step`. N:M is one-shot at `begin_step`: each group
keeps its N largest weights, so there is no fraction to ramp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from compress.sparsity_masks import (check_n_m, check_ratio, global_magnitude_masks, magnitude_mask, n_m_mask,
                                     parse_n_m)
from compress.sparsity_report import SparsityRow, format_sparsity_report, sparsity_report
from compress.sparsity_rules import DEFAULT_MIN_SIZE, Rule, Selected, as_rules, select
from zoo.tree import flatten, unflatten

__all__ = ["Rule", "Sparsifier", "SparsityRow", "check_n_m", "format_sparsity_report", "sparsity_report"]

SCHEDULES = ("oneshot", "polynomial")
SCOPES = ("global", "layer")


@dataclass(frozen=True)
class Sparsifier:
    """A sparsity pass: which weights (`rules`), what pattern (`sparsity`) and when (the schedule).

    sparsity: the target fraction of zeros in [0, 1) for unstructured magnitude pruning, or "N:M" ("2:4").
    rules: regex rules over parameter paths (strings, (regex, axis) pairs or `Rule`s); None: every conv / Dense
        kernel with at least `min_size` weights (for N:M without depthwise kernels unless `include_depthwise`, and
        without kernels whose input channels M does not divide; see `compress.sparsity_rules`).
    scope: unstructured only; "global" ranks all selected weights together, "layer" prunes each parameter to the
        target (or its rule's `target`).
    schedule: "oneshot" (the target from `begin_step`) or "polynomial" (unstructured: Zhu & Gupta from
        `initial_sparsity` at `begin_step` to the target at `end_step`, masks updated every `frequency` steps).
    """

    sparsity: float | str = 0.5
    rules: tuple | None = None
    scope: str = "global"
    schedule: str = "oneshot"
    begin_step: int = 0
    end_step: int | None = None
    frequency: int = 100
    initial_sparsity: float = 0.0
    min_size: int = DEFAULT_MIN_SIZE
    include_depthwise: bool = False
    key: str = "sparsity"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - normalizing a frozen dataclass
        if isinstance(self.sparsity, str) and ":" in self.sparsity:
            parse_n_m(self.sparsity)
        elif isinstance(self.sparsity, (int, float, np.number)) and not isinstance(self.sparsity, bool):
            set_("sparsity", check_ratio(self.sparsity, "sparsity"))
        else:
            raise ValueError(f"sparsity must be a fraction of zeros in [0, 1) (unstructured) or an N:M pattern such "
                             f"as '2:4', got {self.sparsity!r}")
        set_("rules", as_rules(self.rules))
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not isinstance(self.begin_step, (int, np.integer)) or self.begin_step < 0:
            raise ValueError(f"begin_step must be an int >= 0, got {self.begin_step!r}")
        if self.n_m is not None:
            if self.schedule != "oneshot":
                raise ValueError(f"N:M sparsity ({self.sparsity}) is one-shot at begin_step; schedule="
                                 f"{self.schedule!r} is for unstructured sparsity")
            if self.rules and any(r.target is not None for r in self.rules):
                raise ValueError("Rule.target sets an unstructured per-layer target; N:M sparsity has none")
        elif self.rules and any(r.target is not None for r in self.rules):
            if self.scope != "layer":
                raise ValueError("Rule.target (a per-layer target) needs scope='layer'")
            for r in self.rules:
                if r.target is not None:
                    check_ratio(r.target, f"target of rule {r.pattern!r}")
        if self.schedule == "polynomial":
            if self.end_step is None or self.end_step <= self.begin_step:
                raise ValueError(f"schedule='polynomial' needs end_step > begin_step ({self.begin_step}), got "
                                 f"{self.end_step!r}")
            if not isinstance(self.frequency, (int, np.integer)) or self.frequency < 1:
                raise ValueError(f"frequency must be a positive int (steps between mask updates), got "
                                 f"{self.frequency!r}")
            init = check_ratio(self.initial_sparsity, "initial_sparsity")
            finals = [self.sparsity] + [r.target for r in self.rules or () if r.target is not None]
            if init > min(finals):
                raise ValueError(f"initial_sparsity={init} exceeds the target sparsity {min(finals)}")
        if not isinstance(self.min_size, (int, np.integer)) or self.min_size < 0:
            raise ValueError(f"min_size must be an int >= 0, got {self.min_size!r}")

    # ---- plain-value constructor (config switch) ----
    @classmethod
    def from_config(cls, sparsity: str, *, target: float = 0.5, rules=(), scope: str = "global",
                    schedule: str = "oneshot", begin_step: int = 0, end_step: int | None = None,
                    frequency: int = 100, initial: float = 0.0, min_size: int = DEFAULT_MIN_SIZE,
                    include_depthwise: bool = False) -> "Sparsifier":
        """From config values: `sparsity` "N:M" ("2:4") or "unstructured" (with `target`); `rules` regex strings
        (empty: the default set).

            Sparsifier.from_config("unstructured", target=0.8, schedule="polynomial", end_step=2000)
        """
        spec = str(sparsity).strip().lower()
        if spec in ("unstructured", "magnitude"):
            value: float | str = target
        elif ":" in spec:
            value = spec
        else:
            raise ValueError(f"compress.sparsity must be 'N:M' (e.g. '2:4') or 'unstructured' (with "
                             f"compress.sparsity_target), got {sparsity!r}")
        return cls(value, rules=tuple(rules) or None, scope=scope, schedule=schedule, begin_step=begin_step,
                   end_step=end_step, frequency=frequency, initial_sparsity=initial, min_size=min_size,
                   include_depthwise=include_depthwise)

    # ---- what and when ----
    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_n_m(self.sparsity) if isinstance(self.sparsity, str) else None

    @property
    def target(self) -> float:
        """The final fraction of zeros in the selected weights (N:M: 1 - N/M)."""
        nm = self.n_m
        return 1.0 - nm[0] / nm[1] if nm else float(self.sparsity)

    def select(self, params) -> list[Selected]:
        """The parameters this pass prunes (raises on rules that match nothing or shapes N:M cannot group)."""
        return select(flatten(params), self.rules, n_m=self.n_m, min_size=self.min_size,
                      include_depthwise=self.include_depthwise)[0]

    def sparsity_at(self, step, final: float | None = None):
        """Fraction of zeros the schedule asks for after `step` updates (python or traced `step`)."""
        final = self.target if final is None else final
        t = jnp.asarray(step, jnp.float32)
        if self.schedule == "oneshot":
            return jnp.where(t >= self.begin_step, final, 0.0)
        p = jnp.clip((t - self.begin_step) / (self.end_step - self.begin_step), 0.0, 1.0)
        s = final + (self.initial_sparsity - final) * (1.0 - p) ** 3
        return jnp.where(t >= self.begin_step, s, 0.0)

    def _updates_at(self, t):
        """Whether the masks are recomputed after update `t` (t >= 1; step 0 is `init`)."""
        if self.schedule == "oneshot":
            return t == self.begin_step
        on_grid = (t - self.begin_step) % self.frequency == 0
        return (t >= self.begin_step) & (t <= self.end_step) & (on_grid | (t == self.end_step))

    # ---- masks ----
    def _compute(self, chosen: list[Selected], flat: dict, old: dict, t) -> dict:
        """New masks at step `t` from the weights that survive the old masks (so pruned weights stay pruned)."""
        ws = [jnp.where(old[s.path], flat[s.path], 0) for s in chosen]
        nm = self.n_m
        if nm:
            return {s.path: n_m_mask(w, nm[0], nm[1], s.axis) for s, w in zip(chosen, ws)}
        if self.scope == "global":
            return dict(zip([s.path for s in chosen], global_magnitude_masks(ws, self.sparsity_at(t))))
        return {s.path: magnitude_mask(w, self.sparsity_at(t, self.sparsity if s.target is None else s.target))
                for s, w in zip(chosen, ws)}

    def masks(self, params, step: int | None = None) -> dict:
        """Masks (nested like the selected params, True = kept) at the target, or at schedule step `step`."""
        chosen = self.select(params)
        flat = flatten(params)
        old = {s.path: jnp.ones(s.shape, bool) for s in chosen}
        if step is None:
            step = self.end_step if self.schedule == "polynomial" else self.begin_step
        fn = jax.jit(lambda f, o, t: self._compute(chosen, f, o, t))
        return unflatten(fn({s.path: flat[s.path] for s in chosen}, old, jnp.int32(step)))

    def init(self, params) -> dict:
        """The compression state to start training with: `train.fit(..., compression=sp.init(params))`."""
        chosen = self.select(params)
        if float(self.sparsity_at(0)) > 0:  # prunes from the start: masks from the initial weights
            masks = self.masks(params, step=0)
        else:
            masks = unflatten({s.path: jnp.ones(s.shape, bool) for s in chosen})
        return {self.key: {"step": jnp.zeros((), jnp.int32), "masks": masks}}

    def _state(self, compression: dict) -> dict:
        if not isinstance(compression, dict) or self.key not in compression:
            raise ValueError(f"the compression state has no {self.key!r} entry: start training with "
                             f"compression=sparsifier.init(params) (merged with any other compression state)")
        return compression[self.key]

    def hook(self, params, compression):
        """Train-loop hook `(params, compression) -> (params, compression)`, run after every optimizer update."""
        st = self._state(compression)
        flat = flatten(params)
        old = flatten(st["masks"])
        chosen = self.select(params)
        if {s.path for s in chosen} != set(old):
            raise ValueError(f"the sparsity masks cover {sorted(old)[:4]}... but the rules now select "
                             f"{sorted(s.path for s in chosen)[:4]}...: re-run init on these params")
        t = st["step"] + 1
        if self.schedule == "oneshot" and self.begin_step == 0:
            masks = old  # fixed since init
        else:
            sel = {s.path: flat[s.path] for s in chosen}
            masks = jax.lax.cond(self._updates_at(t), lambda: self._compute(chosen, sel, old, t), lambda: old)
        for path, m in masks.items():
            flat[path] = jnp.where(m, flat[path], jnp.zeros((), flat[path].dtype))
        new = {**compression, self.key: {"step": t, "masks": unflatten(dict(masks))}}
        return unflatten(flat), new

    def apply(self, params, state: dict | None = None):
        """`params` with the pruned weights zeroed: by `state`'s masks (from `init` or training), else one-shot at
        the target from these weights' magnitudes."""
        masks = flatten(self._state(state)["masks"] if state is not None else self.masks(params))
        flat = flatten(params)
        missing = sorted(set(masks) - set(flat))
        if missing:
            raise ValueError(f"the masks name parameters these params lack: {missing[:4]}")
        for path, m in masks.items():
            flat[path] = jnp.where(m, flat[path], jnp.zeros((), flat[path].dtype))
        return unflatten(flat)

    def describe(self, params) -> str:
        """One paragraph: the pattern, the schedule, and what is pruned and skipped (by default rules)."""
        chosen, skipped = select(flatten(params), self.rules, n_m=self.n_m, min_size=self.min_size,
                                 include_depthwise=self.include_depthwise)
        n = sum(math.prod(s.shape) for s in chosen)
        what = f"N:M {self.sparsity}" if self.n_m else f"{self.target:.0%} unstructured ({self.scope})"
        when = (f"one-shot at step {self.begin_step}" if self.schedule == "oneshot" else
                f"polynomial {self.initial_sparsity:.0%} -> {self.target:.0%} over steps {self.begin_step}-"
                f"{self.end_step}, every {self.frequency}")
        lines = [f"{what}, {when}: {len(chosen)} parameters ({n:,} weights)"]
        lines += [f"  skipped {p}: {why}" for p, why in skipped]
        return "\n".join(lines)
