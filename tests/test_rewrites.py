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
        with jax.named_scope("stages_0/conv"):  # a module path: tensor names in the file come from it
            a, b = x @ params["a"], x @ params["b"]
        joined = jax.nn.relu(jnp.concatenate([a, b], axis=-1))  # moves
        shared = jnp.concatenate([a, b], axis=-1)  # used twice: stays
        return {"joined": joined, "shared": jax.nn.relu(shared) + shared, "max": jnp.maximum(a, 0.0)}

    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((5, 3)).astype(np.float32), "b": rng.standard_normal((5, 4)).astype(np.float32)}
    x = rng.standard_normal((2, 5)).astype(np.float32)
    want, got = fn(params, x), relu_before_concatenate(fn)(params, x)
    assert jax.tree_util.tree_structure(want) == jax.tree_util.tree_structure(got)
    for k in want:  # the same function; XLA may fuse the products differently (1 ulp on an AMD EPYC)
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, atol=1e-6)
    before, after = _primitives(fn, params, x), _primitives(relu_before_concatenate(fn), params, x)
    # the moved ReLU: one per part (2), the shared concatenation's stays (1); the original one is gone
    assert before.count("custom_jvp_call") == 2 and after.count("custom_jvp_call") == 3
    moved = ["custom_jvp_call", "custom_jvp_call", "concatenate"]
    assert any(after[i:i + 3] == moved for i in range(len(after))), after
    # ops keep their module paths (int8_keep_float and the row split select ops by them)
    eqns = jax.make_jaxpr(relu_before_concatenate(fn))(params, x).jaxpr.eqns
    assert all("stages_0/conv" in str(e.source_info.name_stack) for e in eqns if e.primitive.name == "dot_general")


def test_a_function_without_the_pattern_is_traced_as_it_is():
    fn = lambda x: jax.nn.relu(x) * 2  # noqa: E731
    x = np.ones((2, 3), np.float32)
    assert _primitives(relu_before_concatenate(fn), x) == _primitives(fn, x)


def test_float_gelu_is_the_exact_gelu_within_float32_rounding():
    from scipy.special import erf

    from export.rewrites import erf_rational, gelu_float_friendly

    x = np.linspace(-8, 8, 100_001).astype(np.float32)
    assert np.abs(np.asarray(erf_rational(x)) - erf(x.astype(np.float64))).max() < 5e-7
    exact = np.asarray(jax.nn.gelu(x, approximate=False))
    assert np.abs(np.asarray(gelu_float_friendly(x)) - exact).max() < 2e-6  # |x| up to 8: a few float32 steps
    # MUL/ADD/DIV/MINIMUM/MAXIMUM only: no comparison or select, which XNNPACK would leave to the CPU kernels
    prims = set(_primitives(gelu_float_friendly, x))
    assert prims <= {"mul", "add", "div", "clamp", "max", "min", "pjit", "jit"}, prims
