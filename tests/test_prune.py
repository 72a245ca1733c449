"""Channel pruning (compress.prune): slicing consistency, MACs, save/load, errors; recovery by fine-tuning (slow).
The latency of pruned models is measured by `bench/compression.py`.

Consistency is proven numerically: channels made dead (producing filters and BN gamma/beta zero) contribute exactly
nothing, so removing them must leave the logits unchanged, while removing live channels must change them.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import zoo
from compress.prune import (CRITERIA, DEFAULT_SCOPE, DEFAULT_SCOPE_WITHOUT_MID, channel_groups, kept_channels,
                            load_pruned, prune_channels, save_pruned)
from compress.prune_io import ARCH_FILE, WEIGHTS_FILE
from architectures import families, smallest
from quick_compile import quick_compile
from reference import random_images, random_variables
from zoo.models.mobilenet_base import MobileNet
from zoo.registry import get_entry

HW = (96, 96)
# One jitted forward per architecture: models with the same (equal, hashable) module share the compiled function.
_logits = jax.jit(lambda module, variables, x: module.apply(variables, x), static_argnums=0)


def logits(model: zoo.Model, x) -> np.ndarray:
    return np.asarray(_logits(model.module, model.variables, x))


def _model(name: str, hw=HW, seed: int = 0) -> zoo.Model:
    """Random variables with non-trivial BN statistics and biases (so dead channels are not dead by accident)."""
    module = zoo.create_model(name)
    flat = traverse_util.flatten_dict(random_variables(module, (1, *hw, 3), seed))
    rng = np.random.default_rng(seed + 1)
    for key, v in flat.items():
        leaf = key[-1]
        if leaf in ("bias", "mean"):
            flat[key] = rng.normal(0, 0.1, v.shape).astype(v.dtype)
        elif leaf in ("scale", "var"):
            flat[key] = rng.uniform(0.5, 1.5, v.shape).astype(v.dtype)
    variables = jax.tree_util.tree_map(jnp.asarray, traverse_util.unflatten_dict(flat))
    return zoo.Model(module, variables, get_entry(name).cfg.replace(input_size=hw))


def _kill(model: zoo.Model, ratio: float, scope) -> tuple[zoo.Model, dict[str, np.ndarray]]:
    """Make `n - kept(n, ratio)` random channels of every group dead under both criteria; returns the live ones."""
    flat = {"/".join(k): np.array(v) for k, v in traverse_util.flatten_dict(model.variables).items()}
    rng = np.random.default_rng(7)
    live = {}
    for g in channel_groups(model.module):
        if g.kind not in scope:
            continue
        dead = rng.choice(g.size, g.size - kept_channels(g.size, ratio), replace=False)
        live[g.name] = np.setdiff1d(np.arange(g.size), dead)
        flat[g.conv][..., dead] = 0.0  # the producing filters (what "l1" ranks) ...
        if g.kind == "se":
            flat[g.conv.replace("kernel", "bias")][dead] = 0.0
        for bn in g.bns:  # ... and gamma and beta of every BN on the way (what "bn_scale" ranks)
            flat[f"params/{bn}/scale"][dead] = 0.0
            flat[f"params/{bn}/bias"][dead] = 0.0
    variables = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
    return zoo.Model(model.module, variables, model.cfg), live


@pytest.mark.parametrize("name, scope", [
    ("mobilenetv3_large_100", ("mid", "se", "cn")),
    ("tf_efficientnet_lite0", ("mid", "head")),
])
def test_pruning_dead_channels_leaves_the_output_unchanged(name, scope):
    alive = _model(name)
    model, live = _kill(alive, 0.5, scope)
    x = random_images(2, HW)
    ref = logits(model, x)
    pruned = {c: prune_channels(model, 0.5, criterion=c, scope=scope) for c in CRITERIA}
    small = pruned["bn_scale"]
    assert type(small.module) is type(model.module) and small.cfg.name == f"{name}_pruned50"
    widths = {g.name: g.size for g in channel_groups(small.module)}
    assert {k: widths[k] for k in live} == {k: len(v) for k, v in live.items()}
    # both criteria find the same dead channels: identical variables
    assert jax.tree_util.tree_all(jax.tree.map(np.array_equal, small.variables, pruned["l1"].variables))
    out = logits(small, x)
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() <= 1e-5 * scale + 1e-5, np.abs(out - ref).max()
    # the check has teeth: pruning the same widths of live channels changes the logits
    before, after = logits(alive, x), logits(prune_channels(alive, 0.5, scope=scope), x)
    assert np.abs(after - before).max() > 1e-2 * np.abs(before).max()


# Every family built on the MobileNet stage builder (the class channel pruning works on), found in the registry.
PRUNABLE = sorted(f for f, names in families().items() if isinstance(zoo.create_model(names[0]), MobileNet))


@pytest.mark.parametrize("family", PRUNABLE)
def test_every_builder_family_prunes_to_a_smaller_model_computing_the_same(family):
    """The family's smallest member, every default-scope group half dead: removing the dead channels leaves the
    logits unchanged, and the result is an ordinary smaller model of the same class."""
    name = smallest(families()[family])
    alive = _model(name, hw=(64, 64))
    scope = DEFAULT_SCOPE if any(g.kind == "mid" for g in channel_groups(alive.module)) else DEFAULT_SCOPE_WITHOUT_MID
    model, live = _kill(alive, 0.5, scope)
    assert live, f"{name}: nothing to prune in scope {scope}"
    x = random_images(2, (64, 64))
    small = prune_channels(model, 0.5)
    assert type(small.module) is type(model.module)
    assert zoo.count_params(small.variables["params"]) < zoo.count_params(model.variables["params"])
    with quick_compile():  # two networks run once on two images
        ref, out = logits(model, x), logits(small, x)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-5, np.abs(out - ref).max()


@pytest.fixture(scope="module")
def large224():
    return _model("mobilenetv3_large_100", hw=(224, 224))


def test_pruned_mobilenetv3_has_fewer_macs_and_params(large224):
    shape = (1, 224, 224, 3)
    base_macs = zoo.count_macs(large224.module, large224.variables, shape)
    base_params = zoo.count_params(large224.variables["params"])
    macs, params = {}, {}
    for ratio in (0.3, 0.5):
        small = prune_channels(large224, ratio)
        macs[ratio] = zoo.count_macs(small.module, small.variables, shape)
        params[ratio] = zoo.count_params(small.variables["params"])
        for g in channel_groups(small.module):
            assert g.size % 8 == 0 or g.size == next(
                h.size for h in channel_groups(large224.module) if h.name == g.name), g
    print(f"\nmobilenetv3_large_100 @224: MACs {base_macs / 1e6:.1f}M -> {macs[0.3] / 1e6:.1f}M (30%), "
          f"{macs[0.5] / 1e6:.1f}M (50%); params {base_params / 1e6:.3f}M -> {params[0.3] / 1e6:.3f}M, "
          f"{params[0.5] / 1e6:.3f}M")
    assert macs[0.5] <= 0.7 * base_macs
    assert base_macs > macs[0.3] > macs[0.5]
    assert base_params > params[0.3] > params[0.5]


def test_ratio_dict_prunes_only_matching_groups(large224):
    small = prune_channels(large224, {r"stages_5/.*/mid": 0.5, r"stages_4/block_0/se": 0.5})
    before = {g.name: g.size for g in channel_groups(large224.module)}
    changed = {g.name for g in channel_groups(small.module) if g.size != before[g.name]}
    assert changed == {"stages_5/block_0/mid", "stages_5/block_1/mid", "stages_5/block_2/mid",
                       "stages_4/block_0/se"}


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = _model("tf_efficientnet_lite0", hw=(64, 64))
    module = model.module.clone(num_classes=10)  # as after fine-tuning on a 10-class task
    params = dict(model.variables["params"])
    params["head"] = {**params["head"], "fc": {"kernel": params["head"]["fc"]["kernel"][:, :10],
                                               "bias": params["head"]["fc"]["bias"][:10]}}
    model = zoo.Model(module, {**model.variables, "params": params}, model.cfg.replace(num_classes=10))
    small = prune_channels(model, 0.4, scope=("mid", "head"))
    out = save_pruned(small, tmp_path / "p40")
    assert sorted(p.name for p in out.iterdir()) == [WEIGHTS_FILE, ARCH_FILE]
    arch = json.loads((out / ARCH_FILE).read_text())
    assert arch["base"] == "tf_efficientnet_lite0" and arch["module"]["num_classes"] == 10
    again = load_pruned(out)
    assert again.module == small.module and again.cfg == small.cfg
    x = random_images(2, (64, 64))
    np.testing.assert_array_equal(logits(again, x), logits(small, x))

    # the JSON pins its weights: other weights in the same place are refused
    save_pruned(prune_channels(model, 0.3), tmp_path / "other")
    (out / WEIGHTS_FILE).write_bytes((tmp_path / "other" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match="sha256 differs"):
        load_pruned(out)


@pytest.fixture(scope="module")
def lite():
    return _model("tf_efficientnet_lite0", hw=(64, 64))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(ratio=0.0), ValueError, r"in \(0, 1\)"),
    (dict(ratio=1.0), ValueError, r"in \(0, 1\)"),
    (dict(ratio=-0.2), ValueError, r"in \(0, 1\)"),
    (dict(ratio=True), ValueError, r"in \(0, 1\)"),
    (dict(ratio="0.5"), ValueError, r"in \(0, 1\)"),
    (dict(ratio={"stages_1/.*": 1.5}), ValueError, r"ratio\['stages_1/\.\*'\]"),
    (dict(ratio={"stages_9/.*": 0.5}), ValueError, "match no channel group"),
    (dict(ratio={"(": 0.5}), ValueError, "not a regular expression"),
    (dict(ratio={}), ValueError, "empty dict"),
    (dict(ratio=0.5, criterion="l2"), ValueError, "criterion must be one of"),
    (dict(ratio=0.5, scope=("mid", "stem")), ValueError, "scope must be"),
])
def test_bad_arguments_raise(lite, kwargs, error, match):
    with pytest.raises(error, match=match):
        prune_channels(lite, **kwargs)


def test_unsupported_inputs_raise():
    vit = zoo.create_model("mobilevit_xxs")
    abstract = jax.eval_shape(lambda: vit.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    with pytest.raises(ValueError, match="supports the families built on the MobileNet stage builder.*MobileViT"):
        prune_channels(zoo.Model(vit, abstract, get_entry("mobilevit_xxs").cfg), 0.5)
    mnv3 = zoo.create_model("mobilenetv3_small_050")
    model = zoo.Model(mnv3, {}, get_entry("mobilenetv3_small_050").cfg)
    with pytest.raises(ValueError, match="scope 'head' needs a head conv followed by BatchNorm"):
        prune_channels(model, 0.5, scope=("mid", "head"))
    with pytest.raises(TypeError, match="expects a zoo.Model"):
        prune_channels(mnv3, 0.5)


def test_save_refuses_what_it_cannot_record(lite, tmp_path):
    bf16 = zoo.Model(lite.module.clone(dtype=jnp.bfloat16), lite.variables, lite.cfg)
    with pytest.raises(ValueError, match=r"differs from registered 'tf_efficientnet_lite0' in \['dtype'\]"):
        save_pruned(bf16, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="neither a registered model"):
        save_pruned(zoo.Model(lite.module, lite.variables, lite.cfg.replace(name="my_net")), tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not a directory written by save_pruned"):
        load_pruned(tmp_path)


@pytest.mark.slow
def test_finetuning_recovers_the_accuracy_lost_to_pruning(mnist5k, lite0_digits, xla_cache, tmp_path, monkeypatch):
    """lite0 fine-tuned on digits (recipe mnist5k_lite0, ~96%), 50% pruned (measured: 10%), 30 more steps (89%).

    The TF-ported lite0 was not trained with a sparsity penalty on BN gammas, so no channel is free to remove: the
    drop right after pruning is large, and what the short fine-tune recovers is the point.
    """
    import train
    from conftest import recipe_config

    monkeypatch.setenv("ZOO_OFFLINE", "1")
    (xtr, ytr), (xte, yte) = mnist5k

    def recipe(name: str, steps: int) -> train.TrainConfig:
        return recipe_config(tmp_path / name, xla_cache, steps=steps)

    finetuned = lite0_digits[0].model  # the recipe's 60 steps (conftest), ~96%
    small = prune_channels(finetuned, 0.5)
    pruned_acc = train.evaluate(small, (xte, yte), gray_to_rgb=True)["accuracy"]
    result = train.fit(recipe("pruned", 30), model=small, train_data=(xtr, ytr), eval_data=(xte, yte))
    print(f"\nlite0 on digits, 50% pruned: {pruned_acc:.3f} right after pruning, "
          f"{result.metrics['accuracy']:.3f} after 30 steps")
    assert result.metrics["accuracy"] >= pruned_acc + 0.3
    assert result.metrics["accuracy"] >= 0.8

    # the fine-tuned pruned model (a plain zoo.Model from train) saves and loads like the pruned one
    again = load_pruned(save_pruned(result.model, tmp_path / "saved"))
    assert again.cfg.name == "tf_efficientnet_lite0_pruned50" and again.cfg.num_classes == 10
    x = random_images(2, (64, 64))
    np.testing.assert_array_equal(logits(again, x), logits(result.model, x))
