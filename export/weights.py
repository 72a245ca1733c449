"""Random variables for exporting and timing models that have no offline weights, without compiling an init.

`zoo.load(name, pretrained=False)` compiles `module.init`, which costs 5-15 s per model on XLA:CPU. Export checks and
latency runs only need arrays of the right shapes with sensible scales, so the abstract tree from `jax.eval_shape` is
filled with numpy: He fan-in normal kernels (the network neither explodes nor dies, so logits stay in a range where
fp32 parity at 1e-4 is meaningful), unit BN/LN scales and variances, zero shifts and means, small normal elsewhere.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from zoo.abstract import abstract_variables


def random_variables(module, input_shape: tuple[int, ...], seed: int = 0, kernel_gain: float = 2.0) -> dict:
    """Concrete numpy variables for `module` (see the module docstring for the scales)."""
    return fill_variables(abstract_variables(module, input_shape), seed, kernel_gain)


def fill_variables(abstract, seed: int = 0, kernel_gain: float = 2.0) -> dict:
    """Numpy arrays for an abstract variable tree: kernels N(0, kernel_gain / fan_in) (2: He, for ReLU-like
    networks; 1: LeCun), unit BN/LN scales and variances, zero shifts."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        key = str(getattr(path[-1], "key", path[-1]))
        shape, dtype = leaf.shape, leaf.dtype
        if key == "kernel" and len(shape) >= 2:
            fan_in = int(np.prod(shape[:-1]))
            return (rng.standard_normal(shape) * math.sqrt(kernel_gain / fan_in)).astype(dtype)
        if key in ("scale", "var"):
            return np.ones(shape, dtype)
        if key in ("bias", "mean"):
            return np.zeros(shape, dtype)
        return (rng.standard_normal(shape) * 0.02).astype(dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def calibrate_batch_stats(module, variables, x) -> dict:
    """`variables` with BatchNorm statistics measured on the batch `x` (data-dependent init of random weights).

    Random kernels with unit BN statistics let activations grow or shrink layer by layer, so a random network's
    activation ranges look nothing like a trained one's - which matters for int8 (XNNPACK rejects int8 ADDs whose
    input and output scales are too far apart) and for any accuracy-like comparison. One train-mode pass normalizes
    every BN by the statistics of `x`; the running averages it returns (flax momentum 0.9, starting from mean 0 and
    variance 1) are inverted to those batch statistics, so that eval mode then reproduces the train-mode pass.
    """
    if not variables.get("batch_stats"):  # no BatchNorm (e.g. ConvNeXt's LayerNorms): nothing to calibrate
        return variables

    def batch_stat(path, new):
        key = str(getattr(path[-1], "key", path[-1]))
        new = np.asarray(new, np.float32)
        return new / 0.1 if key == "mean" else np.maximum((new - 0.9) / 0.1, 1e-3)

    start = jax.tree_util.tree_map_with_path(
        lambda p, a: np.zeros_like(a) if str(getattr(p[-1], "key", "")) == "mean" else np.ones_like(a),
        variables["batch_stats"])
    fn = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"],
                                           rngs={"dropout": jax.random.key(0)}))
    _, upd = fn({**variables, "batch_stats": start}, jnp.asarray(x, jnp.float32))
    return {**variables, "batch_stats": jax.tree_util.tree_map_with_path(batch_stat, upd["batch_stats"])}
