"""`Forward`: the network bound to its variables inside one traced step (train flag, dropout rng, updated model
state, named outputs). Tasks and distillation call the network only through it."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax


class Forward:
    """The model bound to its variables for one step: `forward(x) -> output`, `forward.features(x) -> named outputs`.

    In training it runs BatchNorm on batch statistics and keeps the new statistics in `model_state`; in evaluation the
    running statistics are used and nothing changes. One object lives inside one traced step.
    """

    def __init__(self, module: nn.Module, params, model_state: Mapping[str, Any], *, train: bool,
                 rng: jax.Array | None = None):
        self.module, self.params, self.model_state, self.train, self.rng = module, params, dict(model_state), train, rng
        self.output = None

    def _apply(self, x, **kwargs):
        variables = {"params": self.params, **self.model_state}
        mutable = list(self.model_state) if self.train else False
        rngs = {"dropout": self.rng} if (self.train and self.rng is not None) else {}
        return self.module.apply(variables, x, train=self.train, mutable=mutable, rngs=rngs, **kwargs)

    def __call__(self, x, **kwargs):
        out = self._apply(x, **kwargs)
        if self.train:
            out, updates = out
            self.model_state = {**self.model_state, **dict(updates)}
        self.output = out
        return out

    def features(self, x) -> dict[str, jax.Array]:
        """The backbone's dict of named outputs (`module.apply(..., features=True)`, see `zoo.models.heads`).

        Runs with the same train flag and dropout rng as `__call__`, so on the same input it sees what the call that
        gives the output sees; the statistics kept are that call's, not these. It is a second application of the
        network in the traced step: XLA can merge the identical forward computation, but gradients flow back
        through both.
        """
        out = self._apply(x, features=True)
        if self.train:
            out, _ = out
        if not isinstance(out, Mapping):
            raise TypeError(f"{type(self.module).__name__}(x, features=True) returned {type(out).__name__}; a model "
                            "returns its named outputs as a dict keyed by its feature_info names and 'pre_logits'")
        return dict(out)
