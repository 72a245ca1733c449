"""Token merging (`zoo.layers.token_merging`, DeiT's `merge_tokens`): one merge step against the paper's procedure
written directly (gathers and scatter-adds in float64, the class token kept from matching by a -inf score as the
paper's code does), what merging conserves, proportional attention, the schedule, and the model with r=0 being the
model without merging."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.layers.attention import Attention
from zoo.layers.token_merging import bipartite_merge, merge_schedule

from quick_compile import quick_compile
from reference import random_variables


def _paper_merge(x, size, metric, r):
    """One ToMe step with a class token at position 0, per image, float64: sets A/B by even/odd position, the class
    token's scores -inf, A ranked by best score (descending, stable), the first r merged (scatter-add of size-weighted
    tokens into their partners), the rest kept in position order, output [kept A, B]."""
    out_x, out_s = [], []
    for xi, si, mi in zip(np.float64(x), np.float64(size), np.float64(metric)):
        mi = mi / np.linalg.norm(mi, axis=-1, keepdims=True)
        a_idx, b_idx = np.arange(0, len(xi), 2), np.arange(1, len(xi), 2)
        scores = mi[a_idx] @ mi[b_idx].T
        scores[0] = -np.inf
        best, match = scores.max(-1), scores.argmax(-1)
        order = np.argsort(-best, kind="stable")
        merged, kept = order[:r], np.sort(order[r:])
        xb, sb = xi[b_idx] * si[b_idx], si[b_idx].copy()
        for i in merged:
            xb[match[i]] += xi[a_idx[i]] * si[a_idx[i]]
            sb[match[i]] += si[a_idx[i]]
        out_x.append(np.concatenate([xi[a_idx[kept]], xb / sb]))
        out_s.append(np.concatenate([si[a_idx[kept]], sb]))
    return np.stack(out_x), np.stack(out_s)


def _tokens(n, c=8, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, n, c)).astype(np.float32)
    size = rng.integers(1, 4, (2, n, 1)).astype(np.float32)
    metric = rng.standard_normal((2, n, d)).astype(np.float32)
    return x, size, metric


@pytest.mark.parametrize("n,r", [(17, 5), (16, 7), (9, 4)])
def test_merge_step_is_the_papers_with_a_class_token(n, r):
    x, size, metric = _tokens(n)
    got_x, got_s = bipartite_merge(jnp.asarray(x), jnp.asarray(size), jnp.asarray(metric), r, num_prefix=1)
    want_x, want_s = _paper_merge(x, size, metric, r)
    assert got_x.shape == (2, n - r, 8)
    np.testing.assert_allclose(np.asarray(got_s), want_s, rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(got_x), want_x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_prefix", [0, 1, 2])
def test_merging_keeps_the_prefix_in_front_and_conserves_patches(num_prefix):
    x, size, metric = _tokens(20, seed=num_prefix)
    got_x, got_s = map(np.asarray, bipartite_merge(jnp.asarray(x), jnp.asarray(size), jnp.asarray(metric), 6,
                                                   num_prefix))
    assert got_x.shape == (2, 14, 8)
    np.testing.assert_array_equal(got_x[:, :num_prefix], x[:, :num_prefix])
    # every patch is in exactly one token, and the size-weighted sum of the tokens is what it was
    np.testing.assert_array_equal(got_s.sum(1), size.sum(1))
    np.testing.assert_allclose((got_x * got_s).sum(1), (x * size).sum(1), rtol=1e-5, atol=1e-4)


def test_identical_tokens_merge_first_and_lose_nothing():
    """Two copies of a token are the most similar pair: merged, they are one token of size 2 with the same value."""
    x, size, metric = _tokens(10, seed=3)
    size = np.ones_like(size)
    x[:, 4], metric[:, 4] = x[:, 7], metric[:, 7]  # A token 4 (even) copies B token 7 (odd)
    got_x, got_s = map(np.asarray, bipartite_merge(jnp.asarray(x), jnp.asarray(size), jnp.asarray(metric), 1, 0))
    b_pos = 4 + 3  # 4 kept A tokens, then B token 7 is B's fourth (1, 3, 5, 7)
    np.testing.assert_allclose(got_x[:, b_pos], x[:, 7], rtol=1e-6)
    assert (got_s[:, b_pos, 0] == 2).all() and got_s.sum() == size.sum()


def test_proportional_attention_weighs_a_merged_token_as_its_copies():
    """Attention over a sequence holding one token twice equals attention over the sequence holding it once with
    log(2) added to its key's logit: what merging with sizes relies on."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 6, 16)), jnp.float32)
    twice = jnp.concatenate([x, x[:, 2:3]], axis=1)
    attn = Attention(num_heads=2)
    v = attn.init(jax.random.key(0), x)
    want = attn.apply(v, twice)[:, :6]
    bias = jnp.log(jnp.asarray([[1, 1, 2, 1, 1, 1]], jnp.float32))
    got, keys = attn.apply(v, x, key_bias=bias, return_keys=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert keys.shape == (1, 6, 8)



def test_block_attends_in_proportion_to_token_sizes():
    """A transformer block given sizes (no merge) computes for a sequence holding a token once with size 2 what it
    computes for the sequence holding that token twice: the block passes log(size) to its attention."""
    from zoo.layers.transformer import TransformerBlock

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 6, 16)), jnp.float32)
    twice = jnp.concatenate([x, x[:, 2:3]], axis=1)
    block = TransformerBlock(num_heads=2, mlp_ratio=2.0, act="gelu")
    v = block.init(jax.random.key(0), x)
    want, _ = block.apply(v, twice, size=jnp.ones((1, 7, 1), jnp.float32))
    size = jnp.asarray([[1, 1, 2, 1, 1, 1]], jnp.float32)[..., None]
    got, got_size = block.apply(v, x, size=size)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want[:, :6]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got_size), np.asarray(size))

def test_schedule_is_cut_to_what_each_block_can_merge():
    assert merge_schedule(0, 3, 196, 1) == (0, 0, 0)
    assert merge_schedule(8, 2, 196, 1) == (8, 8)
    assert merge_schedule((90, 90, 90), 3, 196, 1) == (90, 53, 26)  # at most half the patch tokens: 98, 53, 26
    assert merge_schedule(2, 12, 16, 2) == (2, 2, 2, 2, 2, 2, 2, 1, 0, 0, 0, 0)  # down to one token
    with pytest.raises(ValueError, match="one per block"):
        merge_schedule((1, 2), 3, 196, 1)
    with pytest.raises(ValueError, match="non-negative"):
        merge_schedule(-1, 3, 196, 1)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_deit_without_merges_is_the_base_model_and_merges_change_the_count(name):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
    base = zoo.create_model(name)
    v = random_variables(base, (1, 64, 64, 3))

    def run(module):  # jitted and quickly compiled: run op by op, a ViT compiles each op on its own
        with quick_compile():
            return np.asarray(jax.jit(module.apply)(v, x))

    want = run(base)
    for r in (0, (0,) * 12):
        np.testing.assert_array_equal(run(zoo.create_model(name, merge_tokens=r)), want)
    merging = zoo.create_model(name, merge_tokens=2)  # 16 patches merged down to one
    got = run(merging)
    assert got.shape == want.shape and np.isfinite(np.asarray(got)).all()
    assert not np.allclose(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="features=True"):
        merging.apply(v, x, features=True)


@pytest.mark.slow
def test_merging_deit_exports_to_tflite_and_matches_jax():
    """Builtin ops only (the ranking is counted by comparisons: a sort has no conversion), verified against JAX by
    the exporter; the matching runs on TFLite's builtin kernels between XNNPACK partitions (about two per merging
    block: bench/token_merging.py measures what that costs)."""
    from export import to_tflite

    module = zoo.create_model("deit_tiny_patch16_224", merge_tokens=3)  # 36 patches at 96x96: 33, 30, ... 4 left
    variables = random_variables(module, (1, 96, 96, 3))
    res = to_tflite(module, variables, input_hw=(96, 96), progress=False)
    assert res.verification.passed and res.verification.max_abs_diff < 1e-4
    assert not res.ops.unsupported and res.ops.ops.get("BATCH_MATMUL", 0) > 0
    assert 1 < res.delegate.partitions <= 2 * 12 + 1, res.delegate.summary()
