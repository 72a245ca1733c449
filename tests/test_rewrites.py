"""Export-time rewrites of the traced function: exact, and shaped as intended."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from export.rewrites import relu_before_concatenate


def _primitives(fn, *args) -> list[str]:
    return [e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns]


def test_relu_moves_onto_the_parts_of_a_concatenation_and_nothing_else_changes():
    def fn(params, x):
        a, b = x @ params["a"], x @ params["b"]
        joined = jax.nn.relu(jnp.concatenate([a, b], axis=-1))  # moves
        shared = jnp.concatenate([a, b], axis=-1)  # used twice: stays
        return {"joined": joined, "shared": jax.nn.relu(shared) + shared, "max": jnp.maximum(a, 0.0)}

    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((5, 3)).astype(np.float32), "b": rng.standard_normal((5, 4)).astype(np.float32)}
    x = rng.standard_normal((2, 5)).astype(np.float32)
    want, got = fn(params, x), relu_before_concatenate(fn)(params, x)
    assert jax.tree_util.tree_structure(want) == jax.tree_util.tree_structure(got)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
    before, after = _primitives(fn, params, x), _primitives(relu_before_concatenate(fn), params, x)
    # the moved ReLU: one per part (2), the shared concatenation's stays (1); the original one is gone
    assert before.count("custom_jvp_call") == 2 and after.count("custom_jvp_call") == 3
    moved = ["custom_jvp_call", "custom_jvp_call", "concatenate"]
    assert any(after[i:i + 3] == moved for i in range(len(after))), after
