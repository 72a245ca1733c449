"""MobileViTv2: the separable attention against its equations in float64, the variants' widths, the aligned resize
of maps that are not a multiple of the patch, the conversion key map, and converted timm weights (GroupNorm affine
random, BatchNorm perturbed) on a non-square input whose maps are not multiples of the patch, in the training and the
deploy form.

`tests/test_parity.py` converts every variant too, but at 256x256 only (every map a multiple of the patch: timm's
resize never runs) and with the GroupNorms at their init (scale 1, shift 0: a scale/shift mix-up would not show).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from compress.deploy import deploy, deploy_param_count
from zoo.convert import convert_state_dict, flatten_variables
from zoo.counting import count_params
from zoo.layers.conv import depthwise_impl
from zoo.layers.linear_attention import GROUP_NORM_EPS, LinearSelfAttention, separable_attention
from zoo.layers.resize_aligned import resize_bilinear_aligned
from zoo.models.mobilevitv2 import VARIANTS, timm_rename

from reference import LazyModule, perturb_batchnorm, random_images, scale_classifier_to_trained_spread, torch

F = LazyModule("torch.nn.functional")

# name: (stem, stage widths, transformer widths of stages 2-4): timm's `_mobilevitv2_cfg(multiplier)`, widths
# int(w * multiplier) of (64, 128, 256, 384, 512), stem int(32 * multiplier), transformers half the stage width
WIDTHS = {
    "mobilevitv2_050": (16, (32, 64, 128, 192, 256), (64, 96, 128)),
    "mobilevitv2_075": (24, (48, 96, 192, 288, 384), (96, 144, 192)),
    "mobilevitv2_100": (32, (64, 128, 256, 384, 512), (128, 192, 256)),
    "mobilevitv2_125": (40, (80, 160, 320, 480, 640), (160, 240, 320)),
    "mobilevitv2_150": (48, (96, 192, 384, 576, 768), (192, 288, 384)),
    "mobilevitv2_175": (56, (112, 224, 448, 672, 896), (224, 336, 448)),
    "mobilevitv2_200": (64, (128, 256, 512, 768, 1024), (256, 384, 512)),
}
# timm 1.0.31's parameter counts (BatchNorm statistics excluded)
TIMM_PARAMS = {"mobilevitv2_050": 1_370_593, "mobilevitv2_075": 2_866_009, "mobilevitv2_100": 4_901_841,
               "mobilevitv2_125": 7_478_089, "mobilevitv2_150": 10_594_753, "mobilevitv2_175": 14_251_833,
               "mobilevitv2_200": 18_449_329}
# maps of stages 2-4 are 13x16 -> 14x16, 7x8 -> 8x8 and 4x4: timm's resize runs, on a non-square map
HW = (100, 124)


def _abstract_params(module, hw=(64, 64)):
    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, *hw, 3))))["params"]


def _stage_width(stage) -> int:
    """The output width of a stage: its last block's last BatchNorm (an inverted residual's or conv_proj's)."""
    last = stage[f"block_{len(stage) - 1}"]
    return (last["conv_proj"]["bn"] if "conv_proj" in last else last["bn3"])["scale"].shape[-1]


def test_registered_variants_are_timms():
    assert set(VARIANTS) == set(WIDTHS) == set(TIMM_PARAMS) == set(zoo.list_models("mobilevitv2_*"))


@pytest.mark.parametrize("name", list(WIDTHS))
def test_variant_widths_and_deploy_counts(name):
    """Widths read from the built parameters; the deploy form drops each BatchNorm's scale and shift and gives its
    conv a bias: C fewer parameters per BatchNorm of C channels."""
    stem, outs, tdims = WIDTHS[name]
    module = zoo.create_model(name)
    params = _abstract_params(module)
    assert params["stem"]["conv"]["kernel"].shape[-1] == stem
    assert [_stage_width(params[f"stages_{i}"]) for i in range(5)] == list(outs)
    assert [params[f"stages_{i}"]["block_1"]["conv_1x1"]["kernel"].shape[-1] for i in (2, 3, 4)] == list(tdims)
    # one query score, then keys and values
    assert params["stages_2"]["block_1"]["transformer_0"]["attn"]["qkv_proj"]["kernel"].shape[-1] == 1 + 2 * tdims[0]
    assert count_params(params) == TIMM_PARAMS[name]
    bn_channels = sum(int(np.prod(leaf.shape)) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
                      if any(getattr(p, "key", "").startswith("bn") for p in path) and path[-1].key == "scale")
    assert deploy_param_count(module, (1, 64, 64, 3)) == TIMM_PARAMS[name] - bn_channels


def test_separable_attention_matches_its_equations_in_float64():
    """Per pixel position p: c_p = sum_n softmax_n(q_pn) k_pn, out_pn = relu(v_pn) * c_p (arXiv:2206.02680),
    one sequence at a time in float64; the module with its 1x1 projections likewise."""
    rng = np.random.default_rng(0)
    b, p, n, c = 2, 4, 9, 6
    q, k, v = rng.standard_normal((b, p, n)) * 3, rng.standard_normal((b, p, n, c)), rng.standard_normal((b, p, n, c))
    expected = np.empty((b, p, n, c))
    for i in range(b):
        for j in range(p):
            s = np.exp(q[i, j] - q[i, j].max())
            s /= s.sum()
            context = (s[:, None] * k[i, j]).sum(axis=0)
            expected[i, j] = np.maximum(v[i, j], 0) * context[None, :]
    got = separable_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=1e-5)

    from zoo.layers.conv import Conv2d

    x = rng.standard_normal((b, p, n, c))
    layer = LinearSelfAttention(Conv2d)
    variables = layer.init(jax.random.key(0), jnp.zeros((b, p, n, c)))
    w_qkv = np.asarray(variables["params"]["qkv_proj"]["kernel"], np.float64)[0, 0]
    b_qkv = np.asarray(variables["params"]["qkv_proj"]["bias"], np.float64)
    w_out = np.asarray(variables["params"]["out_proj"]["kernel"], np.float64)[0, 0]
    b_out = np.asarray(variables["params"]["out_proj"]["bias"], np.float64)
    qkv = x @ w_qkv + b_qkv
    q, k, v = qkv[..., 0], qkv[..., 1:1 + c], qkv[..., 1 + c:]
    s = np.exp(q - q.max(axis=-1, keepdims=True))
    s /= s.sum(axis=-1, keepdims=True)
    context = np.einsum("bpn,bpnc->bpc", s, k)
    expected = (np.maximum(v, 0) * context[:, :, None]) @ w_out + b_out
    got = layer.apply(variables, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.reference
@pytest.mark.parametrize("src,dst", [((7, 5), (8, 6)), ((13, 16), (14, 16)), ((3, 1), (4, 2)), ((1, 1), (2, 2))])
def test_aligned_resize_matches_torch(src, dst):
    x = np.random.RandomState(1).randn(2, *src, 3).astype(np.float32)
    got = np.asarray(resize_bilinear_aligned(jnp.asarray(x), dst))
    ref = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=dst, mode="bilinear", align_corners=True)
    np.testing.assert_allclose(got, ref.numpy().transpose(0, 2, 3, 1), atol=1e-6)


@pytest.fixture(scope="module")
def twin():
    """timm's mobilevitv2_050 with BatchNorms perturbed and every GroupNorm's scale and shift random."""
    from reference import twin_model

    model = twin_model("timm:mobilevitv2_050")
    perturb_batchnorm(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert len(norms) == 2 * (2 + 4 + 3) + 3  # two per transformer layer, one after each transformer
        for m in norms:
            assert m.num_groups == 1 and m.eps == GROUP_NORM_EPS
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model


@pytest.mark.parity
def test_key_map_covers_every_timm_key(twin):
    module = zoo.create_model("mobilevitv2_050")
    target = flatten_variables(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    sd = {k: v.numpy() for k, v in twin.state_dict().items()}
    rename = timm_rename(module)
    assert all(rename(k.rpartition(".")[0]) is not None for k in sd)
    flat = convert_state_dict(sd, rename, target)  # raises on a key it cannot place
    assert set(flat) == set(target)
    assert len(flat) == len([k for k in sd if not k.endswith("num_batches_tracked")])


@pytest.fixture(scope="module")
def converted(twin, tmp_path_factory):
    """(zoo model, images, timm logits, timm stage outputs NHWC) through torch.save -> zoo.load."""
    x = random_images(2, HW)
    x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2))
    scale_classifier_to_trained_spread(twin, x_nchw)
    stages = []
    hooks = [s.register_forward_hook(lambda m, i, o: stages.append(o.numpy().transpose(0, 2, 3, 1)))
             for s in twin.stages]
    with torch.inference_mode():
        logits = twin(x_nchw).numpy()
    for h in hooks:
        h.remove()
    path = tmp_path_factory.mktemp("mobilevitv2") / "twin.pth"
    torch.save(twin.state_dict(), path)
    model = zoo.load("mobilevitv2_050", weights=str(path), layout="timm", progress=False)
    return model, x, logits, stages


def _logits_and_features(module, variables, x):
    with depthwise_impl("native"):
        return jax.jit(lambda v, x: (module.apply(v, x), module.apply(v, x, features=True)))(variables, x)


@pytest.mark.parity
def test_maps_off_the_patch_grid_match_timm(converted):
    """timm resizes (corners aligned) the input of a MobileViTv2 block up to a multiple of the patch and keeps that
    size: the stage maps here are 13x16 -> 14x16 and 7x8 -> 8x8."""
    model, x, expected, stages = converted
    logits, feats = _logits_and_features(model.module, model.variables, x)
    assert [feats[f"stages_{i}"].shape[1:3] for i in range(5)] == [(50, 62), (25, 31), (14, 16), (8, 8), (4, 4)]
    for i, theirs in enumerate(stages):
        ours = np.asarray(feats[f"stages_{i}"])
        assert ours.shape == theirs.shape, i
        assert np.abs(ours - theirs).max() <= 1e-5 * max(1.0, np.abs(theirs).max()), i
    assert 1.0 < np.abs(expected).max() < 100  # a trained model's logit scale, where 1e-4 tests the conversion
    error = np.abs(np.asarray(logits) - expected).max()
    print(f"mobilevitv2_050 {HW}: max|zoo - timm| logits {error:.2e}")
    assert error <= 1e-4


@pytest.mark.parity
def test_deploy_form_matches_timm(converted):
    """`compress.deploy` (every conv+BN one conv with a bias; the GroupNorms stay) against timm on the same input."""
    model, x, expected, _ = converted
    fast = deploy(model)
    assert not jax.tree_util.tree_leaves(fast.variables.get("batch_stats", {}))
    block = fast.variables["params"]["stages_2"]["block_1"]
    assert set(block["conv_kxk"]) == {"conv"} and set(block["conv_kxk"]["conv"]) == {"kernel", "bias"}
    assert set(block["norm"]) == {"scale", "bias"}
    logits, _ = _logits_and_features(fast.module, fast.variables, x)
    error = np.abs(np.asarray(logits) - expected).max()
    print(f"mobilevitv2_050 deploy form {HW}: max|zoo - timm| logits {error:.2e}")
    assert error <= 1e-4
