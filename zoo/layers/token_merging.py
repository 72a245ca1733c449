"""Token merging (ToMe: Bolya et al., "Token Merging: Your ViT But Faster", arXiv:2210.09461) for plain ViT blocks.

Between a block's attention and its MLP, `r` patch tokens are merged into others, so that the MLP and every later
block run on fewer tokens. It adds no parameters: a trained ViT takes it as it is (the paper reports DeiT-S at 2x
the throughput for 0.4 points of ImageNet top-1 with r=13 per block, without training).

Bipartite soft matching (the paper's algorithm): the tokens alternate into two sets by their position in the
sequence, A (even positions) and B (odd); every A token finds its most similar B token by the cosine similarity of
their attention keys (averaged over the heads); the `r` A tokens with the most similar partners are merged into
them, the other A tokens stay, in their order. The sequence becomes the prefix tokens, the A tokens kept, then set B.
Tokens carry a size, the number of patches they hold: a merge is the size-weighted mean, and attention adds log(size)
to each key's logit (proportional attention), so that a merged token weighs as much as the tokens it replaced. With
one class token this is the paper's own procedure step for step (its class token, at position 0, is never matched
and stays first). Every prefix token is kept out of matching and stays in front, where the head reads it: a
distilled model's distillation token too (the paper's code keeps it from being merged into, but moves it).

Shapes stay static (what jit and a TFLite file need): `r` is fixed per block, so each block's token count is known
when tracing. Which tokens go where is decided by ranking A's tokens by their best similarity, counted by pairwise comparisons
(a sort has no TFLite conversion); the moves themselves are one-hot matrices applied by matrix products, exact (each
output sums its inputs times 1), which export as matrix products instead of gathers and scatter-adds.

After a merge the tokens no longer form a map: the merged model classifies; it has no feature pyramid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def merge_schedule(r: int | tuple[int, ...], depth: int, num_patches: int, num_prefix: int) -> tuple[int, ...]:
    """Tokens merged by each of `depth` blocks: one `r` for every block (the paper's constant schedule) or one per
    block, each cut to what its block can merge: half its patch tokens (the paper's limit)."""
    rs = (r,) * depth if isinstance(r, int) else tuple(r)
    if len(rs) != depth or any(not isinstance(v, int) or v < 0 for v in rs):
        raise ValueError(f"merge_tokens must be one non-negative int or {depth} of them (one per block), got {r!r}")
    out, n = [], num_patches
    for v in rs:
        v = min(v, n // 2)  # no more than either set holds
        out.append(v)
        n -= v
    return tuple(out)


def _one_hot(index, n: int, dtype):
    return jax.nn.one_hot(index, n, dtype=dtype)


def bipartite_merge(x, size, metric, r: int, num_prefix: int):
    """Merge `r` patch tokens of `x` (B, N, C) into others (module doc). `size` (B, N, 1): patches per token;
    `metric` (B, N, d): what similarity is measured on (the attention keys). Returns (x, size) with N - r tokens:
    the prefix tokens, the A tokens kept, then set B with what it took in."""
    if r == 0:
        return x, size
    first = num_prefix % 2  # the first patch token in set A (an even position of the whole sequence)

    def split(t):  # (sets A, B) of the patch tokens: as pairs of a reshape (strided slices stay off XNNPACK)
        t = t[:, num_prefix:]
        n = t.shape[1]
        pairs = jnp.pad(t, ((0, 0), (0, n % 2), (0, 0))).reshape(t.shape[0], (n + 1) // 2, 2, t.shape[2])
        na = len(range(first, n, 2))
        return pairs[:, :na, first], pairs[:, :n - na, 1 - first]

    m = metric.astype(jnp.float32)
    a, b = split(m * jax.lax.rsqrt(jnp.sum(m * m, axis=-1, keepdims=True)))
    na, nb = a.shape[1], b.shape[1]
    scores = jnp.einsum("bid,bjd->bij", a, b)
    best, match = scores.max(-1), scores.argmax(-1)  # each A token's partner in B
    # each A token's rank by `best`, the most similar first, ties by position: counted, not sorted (a sort does not
    # convert to TFLite)
    earlier = jnp.asarray(np.tri(na, k=-1), bool)  # [i, j]: j < i
    ahead = (best[:, None, :] > best[:, :, None]) | ((best[:, None, :] == best[:, :, None]) & earlier)
    rank = ahead.sum(-1)
    merged = rank < r  # (B, na)
    dtype = x.dtype
    moves = jnp.swapaxes(_one_hot(match, nb, dtype) * merged[..., None].astype(dtype), 1, 2)  # (B, nb, na)
    kept = ~merged
    slot = jnp.einsum("ij,bj->bi", earlier.astype(jnp.float32), kept.astype(jnp.float32))  # kept tokens before
    keep = _one_hot(slot.astype(jnp.int32), na - r, dtype) * kept[..., None].astype(dtype)  # (B, na, na - r)
    keep = jnp.swapaxes(keep, 1, 2)  # (B, na - r, na), in sequence order
    (xa, xb), (sa, sb) = split(x), split(size)
    total = sb + jnp.einsum("bji,bio->bjo", moves, sa)
    xb = (xb * sb + jnp.einsum("bji,bic->bjc", moves, xa * sa)) / total
    x = jnp.concatenate([x[:, :num_prefix], jnp.einsum("bki,bic->bkc", keep, xa), xb], axis=1)
    size = jnp.concatenate([size[:, :num_prefix], jnp.einsum("bki,bio->bko", keep, sa), total], axis=1)
    return x, size
