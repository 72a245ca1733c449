"""`Forward`: the network bound to its variables inside one traced step (train flag, dropout rng, updated model
state, named intermediate outputs). Tasks and distillation call the network only through it."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax


class Forward:
    """The model bound to its variables for one step: `forward(x) -> output`.

    In training it runs BatchNorm on batch statistics and keeps the new statistics in `model_state`; in evaluation the
    running statistics are used and nothing changes. `capture` (module paths such as "stages_4") records those modules'
    outputs in `captured`. One object lives inside one traced step.
    """

    def __init__(self, module: nn.Module, params, model_state: Mapping[str, Any], *, train: bool,
                 rng: jax.Array | None = None):
        self.module, self.params, self.model_state, self.train, self.rng = module, params, dict(model_state), train, rng
        self.captured: dict[str, jax.Array] = {}
        self.capture: tuple[str, ...] = ()
        self.output = None

    def __call__(self, x, **kwargs):
        variables = {"params": self.params, **self.model_state}
        mutable = list(self.model_state) if self.train else []
        extra = {}
        if self.capture:
            wanted = set(self.capture)
            extra["capture_intermediates"] = lambda mdl, method: method == "__call__" and "/".join(mdl.path) in wanted
            mutable.append("intermediates")
        rngs = {"dropout": self.rng} if (self.train and self.rng is not None) else {}
        out = self.module.apply(variables, x, train=self.train, mutable=mutable or False, rngs=rngs, **extra, **kwargs)
        if mutable:
            out, updates = out
            updates = dict(updates)
            inter = updates.pop("intermediates", {})
            if self.train:
                self.model_state = {**self.model_state, **updates}
            self.captured = {name: _find_capture(inter, name) for name in self.capture}
        self.output = out
        return out


def _find_capture(tree, name: str):
    node = tree
    for part in name.split("/"):
        if part not in node:
            raise KeyError(f"no module '{name}' in the model to capture features from")
        node = node[part]
    return node["__call__"][0]
