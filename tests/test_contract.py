"""Tier 1, the contract every registered model keeps, checked per family over the registry (`architectures.py`):
every family file is registered, and each distinct architecture's deploy form (`compress.deploy`: re-parameterized,
BatchNorm folded) computes what its training form computes, with every norm's affine parameters off their defaults and
BatchNorm statistics taken from data. Parameter counts, MACs and feature maps of every name: `test_models.py`; a small fp32
TFLite export of each distinct architecture: `test_export_models.py`."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

import zoo
import zoo.models
from compress.deploy import deploy, deploy_param_count
from export.weights import calibrate_batch_stats
from zoo.counting import count_params
from zoo.layers.conv import depthwise_impl
from zoo.registry import get_entry

from architectures import SIGNATURE_HW, distinct_architectures, families
from reference import random_variables

FAMILIES = families()


def test_every_family_file_is_imported_and_registered():
    """A family file that registers models but is missing from `zoo/models/__init__.py` would leave the registry
    incomplete without any error."""
    root = Path(zoo.models.__path__[0])
    files = {p.stem for p in root.glob("*.py") if "register_model(" in p.read_text()}
    builders = [get_entry(n).builder for n in zoo.list_models()]  # every task's
    registering = {getattr(b, "func", b).__module__.rsplit(".", 1)[-1] for b in builders}
    assert files == registering, f"family files not registered: {sorted(files - registering)}"
    assert len(FAMILIES) >= 7 and sum(map(len, FAMILIES.values())) >= 40


def _varied_images(n: int, hw: tuple[int, int], seed: int) -> np.ndarray:
    """Random images whose brightness and contrast differ per image, so pooled features differ too (a classifier
    BatchNorm calibrated on nearly equal pooled features divides by ~0 and amplifies float32 rounding)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *hw, 3)) * rng.uniform(0.3, 1.5, (n, 1, 1, 1)) + rng.uniform(-1, 1, (n, 1, 1, 3))
    return x.astype(np.float32)


def _perturbed_norms(variables: dict, seed: int) -> dict:
    """Every norm's scale, shift and running statistics off their defaults (1, 0, 0, 1), so that folding one
    wrongly shows; small enough that activations keep their scale through the depth of the network."""
    rng = np.random.default_rng(seed)
    spread = {"scale": (0.8, 1.2), "bias": (-0.1, 0.1), "mean": (-0.1, 0.1), "var": (0.7, 1.3)}

    def perturb(path, leaf):
        key = str(getattr(path[-1], "key", path[-1]))
        parent = str(getattr(path[-2], "key", path[-2])) if len(path) > 1 else ""
        is_norm = "bn" in parent or "norm" in parent or key in ("mean", "var")
        if key in spread and is_norm:
            lo, hi = spread[key]
            new = rng.uniform(lo, hi, np.shape(leaf))
            return new.astype(np.float32) if key in ("scale", "var") else (np.asarray(leaf) + new).astype(np.float32)
        return leaf

    return jax.tree_util.tree_map_with_path(perturb, variables)


def _logits(module, variables, x, dtype) -> np.ndarray:
    # float64 depthwise convolutions as XLA:CPU's native op run ~100x slower than as shifted slices (no fast kernel
    # for doubles): 13 s instead of 0.1 s for EfficientNet-B0 at 64x64
    impl = "shifted" if dtype == np.float64 else "native"
    with jax.enable_x64(dtype == np.float64), depthwise_impl(impl):
        cast = jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), variables)
        out = jax.jit(lambda v, x: module.apply(v, x, train=False))(cast, x.astype(dtype))
        return np.asarray(out, np.float64)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_deploy_form_computes_the_training_form(family):
    hw = SIGNATURE_HW
    for name in distinct_architectures(FAMILIES[family]):
        module = zoo.create_model(name)
        shape = (1, *hw, 3)
        x = _varied_images(4, hw, seed=1)
        variables = _perturbed_norms(random_variables(module, shape), seed=2)
        with depthwise_impl("native"):  # the same numbers; compiles in half the time of the shifted slices on CPU
            # statistics from data: where blocks sum several normalized branches (MobileOne), statistics not taken
            # from the network's own activations let them grow ~3x per block
            variables = calibrate_batch_stats(module, variables, x)
            deployed = deploy(zoo.Model(module, variables, get_entry(name).cfg))
            trained = _logits(module, variables, x, np.float32)
            got = _logits(deployed.module, deployed.variables, x, np.float32)
            scale = np.max(np.abs(trained))
            # A folding mistake moves outputs by percents; within 1e-4 of the output scale the two forms agree (measured
            # on an AMD EPYC: 0 to 1e-4 for 33 of the 41 architectures).
            if np.max(np.abs(got - trained)) > 1e-4 * scale:
                # Judged against float64: float32 rounding of a deep random network reaches 1e-3 to 7e-2 of its output
                # scale (EfficientViT-M0, LeViT, FBNetV3). The deploy form rounds differently (fewer, fused layers), so
                # it may land a little further from the exact result than the training form; 3x its error still
                # separates the two cases.
                exact = _logits(module, variables, x, np.float64)
                own, err = np.max(np.abs(trained - exact)), np.max(np.abs(got - exact))
                scale = np.max(np.abs(exact))
                assert err <= 3 * own + 1e-6 * scale, f"{name}: deploy form off by {err:.3g} (training form {own:.3g})"
        assert count_params(deployed.variables["params"]) == deploy_param_count(module, shape), name
        assert count_params(deployed.variables["params"]) <= count_params(variables["params"]), name
        assert "batch_stats" not in deployed.variables or not jax.tree_util.tree_leaves(
            deployed.variables["batch_stats"]), f"{name}: BatchNorm left after deploy"
