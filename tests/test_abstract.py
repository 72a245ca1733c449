"""`zoo.abstract`: the structure of a module's variables, traced once per module and input shape."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.abstract import abstract_variables


class Net(nn.Module):
    width: int = 4
    sizes: list | None = None  # a field that cannot be hashed

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.width, (3, 3))(x)
        return nn.BatchNorm(use_running_average=True)(x).mean((1, 2))


def test_the_structure_of_init_traced_once_per_module_and_shape(monkeypatch):
    traces = []
    real = jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: (traces.append(1), real(*a, **k))[1])
    tree = abstract_variables(Net(width=5), (1, 8, 8, 3))
    want = real(lambda: Net(width=5).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(want)
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), tree) == \
        jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), want)
    tree["params"].clear()  # the caller's own dicts: the cached tree is untouched
    again = abstract_variables(Net(width=5), (4, 8, 8, 3))  # an equal module, another batch: no trace
    assert len(traces) == 1 and again["params"]["Conv_0"]["kernel"].shape == (3, 3, 3, 5)
    abstract_variables(Net(width=5), (1, 9, 9, 3))  # another input size: traced
    abstract_variables(Net(width=6), (1, 8, 8, 3))  # another module: traced
    assert len(traces) == 3


def test_a_module_that_cannot_be_hashed_is_traced_each_time():
    tree = abstract_variables(Net(width=3, sizes=[1, 2]), (1, 8, 8, 3))
    assert tree["batch_stats"]["BatchNorm_0"]["mean"].shape == (3,)


def test_facts_of_a_forward_trace_are_cached_per_module_and_shape():
    from zoo.abstract import per_module_and_shape

    calls = []

    @per_module_and_shape
    def widths(module, variables, x):
        calls.append(x.shape)
        out = jax.eval_shape(lambda v, x: module.apply(v, x), variables, x)
        return out.shape[-1], len(variables["params"])

    variables = abstract_variables(Net(width=5), (1, 8, 8, 3))
    assert widths(Net(width=5), variables, jnp.zeros((4, 8, 8, 3))) == (5, 2)
    # an equal module, another batch, other variables of the same structure: cached (traced with batch 1)
    assert widths(Net(width=5), dict(variables), jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)) == (5, 2)
    assert calls == [(1, 8, 8, 3)]
    widths(Net(width=5), variables, jnp.zeros((1, 9, 9, 3)))  # another input size
    widths(Net(width=6), abstract_variables(Net(width=6), (1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))  # another module
    unhashable = Net(width=3, sizes=[1, 2])
    for _ in range(2):
        widths(unhashable, abstract_variables(unhashable, (1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))
    assert len(calls) == 5
