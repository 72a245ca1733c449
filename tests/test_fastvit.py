"""FastViT: parameter counts of both forms against timm (the deploy form against timm's `reparameterize_model`, which
the generic tests do not compare), each re-parameterizable layer of the family against its training form, and
converted timm weights against timm in both forms on a non-square input with every BatchNorm and LayerScale moved
off its init.

`tests/test_parity.py` converts every variant's training form, but with timm's LayerScales at their init (1e-5: the
residual branches then hardly reach the logits, so a mistake in them would not show) and at square inputs only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from compress.deploy import deploy, deploy_param_count
from zoo.counting import count_params
from zoo.layers.conv import Conv2d, depthwise_impl
from zoo.layers.norm import BN_EPS_TORCH, batch_norm
from zoo.models.fastvit import VARIANTS, RepCPE, RepMixer, ReparamLargeKernelConv

from reference import random_images, random_variables

# timm 1.0.31: parameters of the model, and after `timm.utils.model.reparameterize_model`, which leaves the ConvFFN's
# conv+BN and the attention blocks' BatchNorm as they are (../shared/reference/timm_counts.csv lists T8)
TIMM_PARAMS = {
    "fastvit_t8": (4_026_232, 3_996_040),
    "fastvit_t12": (7_553_704, 7_508_840),
    "fastvit_s12": (9_473_576, 9_428_712),
    "fastvit_sa12": (11_580_968, 11_545_320),
    "fastvit_sa24": (21_554_216, 21_501_288),
    "fastvit_sa36": (31_527_464, 31_457_256),
    "fastvit_ma36": (44_068_004, 43_984_632),
}
SHAPE = (1, 64, 64, 3)
HW = (96, 128)  # maps 3x4 in the last stage: attention over a non-square map


def _param_count(module) -> int:
    return count_params(jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(SHAPE)))["params"])


def test_registered_variants_are_timms():
    assert set(VARIANTS) == set(TIMM_PARAMS) == set(zoo.list_models("fastvit_*"))


@pytest.mark.parametrize("name", list(TIMM_PARAMS))
def test_deploy_module_param_counts_match_timms_reparameterized(name):
    """The training form's count is `test_models.py`'s (at the default resolution); the deploy module's here."""
    assert _param_count(zoo.create_model(name, deploy=True)) == TIMM_PARAMS[name][1]


def test_compress_deploy_folds_each_ffn_batchnorm():
    """`compress.deploy` folds each ConvFFN BatchNorm into its conv (one bias of the block's width for the
    BatchNorm's scale and shift) after the re-parameterization."""
    train, fused = TIMM_PARAMS["fastvit_t8"]
    module = zoo.create_model("fastvit_t8")
    assert _param_count(module) == train
    ffn_widths = sum(s.dim * s.depth for s in VARIANTS["fastvit_t8"][0])
    assert deploy_param_count(module, SHAPE) == fused - ffn_widths


def _perturbed(variables, seed: int = 0):
    """Every BatchNorm's scale, shift and statistics, every bias and every LayerScale off their init."""
    rng = np.random.default_rng(seed)

    def move(path, leaf):
        key = str(getattr(path[-1], "key", path[-1]))
        if key in ("scale", "var"):
            return rng.uniform(0.5, 1.5, np.shape(leaf)).astype(np.float32)
        if key in ("bias", "mean"):
            return (rng.standard_normal(np.shape(leaf)) * 0.2).astype(np.float32)
        if key == "gamma":
            return rng.uniform(0.1, 0.5, np.shape(leaf)).astype(np.float32)
        return leaf

    return jax.tree_util.tree_map_with_path(move, variables)


NORM = batch_norm(BN_EPS_TORCH)
LAYERS = {
    "repmixer": (RepMixer(3, Conv2d, NORM), 8, RepMixer.reparameterize),
    "large_kernel": (ReparamLargeKernelConv(16, 7, 2, 8, 3, Conv2d, NORM), 8, ReparamLargeKernelConv.reparameterize),
    "cpe": (RepCPE(7, Conv2d), 8, RepCPE.reparameterize),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_reparameterize_equals_training_form(kind):
    layer, chans, fuse = LAYERS[kind]
    x = np.random.default_rng(1).standard_normal((2, 9, 11, chans)).astype(np.float32)
    variables = _perturbed(random_variables(layer, (1, 9, 11, chans)))
    expected = np.asarray(layer.apply(variables, x))
    fused = fuse(jax.device_get(variables))
    assert set(fused) == {"params"} and set(fused["params"]) == {"reparam_conv"}
    got = np.asarray(layer.clone(deploy=True).apply(fused, x))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, np.abs(expected).max()), rtol=0)


# ------------------------------------------------------------------------------------------------------------ parity
# Small networks of the family (every layer kind, one block per stage: a few seconds to compile, where a registered
# variant takes ~30 s in both forms), built by timm from its variants' code with fewer, narrower blocks and by the zoo
# from the same table.
TINY = {"fastvit_t8": dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128)),
        "fastvit_sa12": dict(layers=(1, 1, 1, 2), embed_dims=(16, 32, 64, 128))}


def _tiny_stages(name: str):
    from zoo.models.fastvit import Stage

    cfg = TINY[name]
    return tuple(Stage(dim=c, depth=d, mlp_ratio=s.mlp_ratio, mixer=s.mixer, pos_emb=s.pos_emb)
                 for d, c, s in zip(cfg["layers"], cfg["embed_dims"], VARIANTS[name][0]))


def _twin(name: str, x_nchw):
    """timm's small network with BatchNorms perturbed, LayerScales in [0.1, 0.5] and logits of a trained model's
    spread."""
    import timm
    import torch

    from reference import perturb_batchnorm, scale_classifier_to_trained_spread

    torch.manual_seed(0)
    twin = timm.create_model(name, **TINY[name]).eval()
    perturb_batchnorm(twin)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        gammas = [p for n, p in twin.named_parameters() if n.endswith("gamma")]
        assert gammas
        for p in gammas:
            p.copy_(torch.rand(p.shape, generator=g) * 0.4 + 0.1)
    scale_classifier_to_trained_spread(twin, x_nchw)
    return twin


@pytest.mark.parity
@pytest.mark.parametrize("name", list(TINY))  # RepMixer only; RepCPE and attention in the last stage
def test_both_forms_match_timm(name, tmp_path):
    """timm's checkpoint through zoo.load; its `compress.deploy` form against timm's `reparameterize_model`; for the
    RepMixer-only table also timm's re-parameterized checkpoint through zoo.load(deploy=True). (timm's deploy form
    keeps the attention blocks' BatchNorm with its statistics, which the zoo's deploy form holds as scale and shift:
    that checkpoint does not load into `deploy=True`.)"""
    import copy

    import torch
    from timm.utils.model import reparameterize_model

    x = random_images(2, HW)
    x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2))
    twin = _twin(name, x_nchw)
    fused_twin = reparameterize_model(copy.deepcopy(twin))
    with torch.inference_mode():
        expected, expected_fused = twin(x_nchw).numpy(), fused_twin(x_nchw).numpy()
    torch.save(twin.state_dict(), tmp_path / "train.pth")
    stages = _tiny_stages(name)
    with depthwise_impl("native"):  # a smaller graph to compile than the CPU default (the same numbers)
        model = zoo.load(name, weights=str(tmp_path / "train.pth"), layout="timm", stages=stages, progress=False)
        assert count_params(model.variables["params"]) == sum(p.numel() for p in twin.parameters())
        error = np.abs(np.asarray(model(x)) - expected).max()
        print(f"{name} small {HW}: training form max|zoo - timm| {error:.2e}")
        assert error <= 1e-4
        fast = deploy(model, input_shape=(1, *HW, 3))
        assert not jax.tree_util.tree_leaves(fast.variables.get("batch_stats", {}))
        error = np.abs(np.asarray(fast.module.apply(fast.variables, x)) - expected_fused).max()
        print(f"{name} small {HW}: compress.deploy form max|zoo - timm reparameterized| {error:.2e}")
        assert error <= 1e-4
        if stages[-1].mixer == "repmixer":
            torch.save(fused_twin.state_dict(), tmp_path / "deploy.pth")
            loaded = zoo.load(name, weights=str(tmp_path / "deploy.pth"), layout="timm", stages=stages, deploy=True,
                              progress=False)
            assert count_params(loaded.variables["params"]) == sum(p.numel() for p in fused_twin.parameters())
            error = np.abs(np.asarray(loaded(x)) - expected_fused).max()
            print(f"{name} small {HW}: timm's deploy checkpoint max|zoo - timm| {error:.2e}")
            assert error <= 1e-4


@pytest.mark.reference
def test_every_timm_tag_is_registered():
    import timm

    ours = set(zoo.list_models("fastvit_*", pretrained=True))
    theirs = {n for n in timm.list_models("fastvit_*", pretrained=True) if n.split(".")[0] in TIMM_PARAMS}
    assert ours == theirs
