"""EfficientViT (MIT): the ReLU linear attention against a direct float64 formulation (its quadratic form, and the
whole layer with its multi-scale aggregation written out in numpy), the variant tables against timm's modules, the
key map against every timm key, and converted timm weights at an odd, non-square input size in the training and the
deploy form.

`tests/test_parity.py` converts every variant too, but at the square default size only, where a height/width mix-up
in the attention's reshapes or a map rounded down instead of up would not show.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from compress.deploy import deploy
from zoo.convert import convert_state_dict, flatten_variables
from zoo.counting import count_params
from zoo.layers.conv import Conv2d, depthwise_impl
from zoo.layers.linear_bn import Conv2dBn
from zoo.layers.relu_linear_attention import EPS, ReluLinearAttention, relu_linear_attention
from zoo.models.efficientvit_mit import VARIANTS, timm_rename

from reference import converted_timm_twin, perturb_batchnorm, random_images, scale_classifier_to_trained_spread

NAMES = sorted(VARIANTS)
HW = (97, 130)  # odd and non-square: maps 49x65, 25x33, 13x17, 7x9, 4x5


def _direct_attention(q, k, v, eps=EPS):
    """The quadratic form in float64: similarities relu(q_n) . relu(k_m), each row normalized by its sum + eps."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    sim = np.einsum("bgnd,bgmd->bgnm", np.maximum(q, 0), np.maximum(k, 0))
    return np.einsum("bgnm,bgme->bgne", sim, v) / (sim.sum(-1, keepdims=True) + eps)


def test_registered_variants_are_timms_names():
    assert set(NAMES) == set(zoo.list_models("efficientvit_b*")) == {f"efficientvit_b{i}" for i in range(4)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_relu_linear_attention_matches_the_quadratic_form(dtype):
    """The linear-time evaluation equals the N x N form; in bfloat16 the products still run in float32."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 50, 8)).astype(np.float32) for _ in range(3))
    q[..., 0, :] = -1.0  # a query with no positive entry: a zero similarity row, the output 0 / eps
    got = relu_linear_attention(*(jnp.asarray(a, dtype) for a in (q, k, v)))
    assert got.dtype == jnp.float32
    expected = _direct_attention(*(np.asarray(jnp.asarray(a, dtype), np.float64) for a in (q, k, v)))
    assert np.abs(np.asarray(got) - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
    assert np.all(np.asarray(got)[..., 0, :] == 0)


def _numpy_layer(params, stats, x, head_dim, bn_eps=1e-5):
    """The whole layer in float64 from its variables, written from the paper's description: 1x1 qkv, depthwise 5x5
    (zero padding 2) then 1x1 grouped per head and q/k/v, heads of [q | k | v] channels, attention, 1x1 conv + BN."""
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    heads, d = c // head_dim, head_dim
    qkv = x @ np.asarray(params["qkv"]["kernel"], np.float64)[0, 0]
    dw = np.asarray(params["aggreg_0"]["dw"]["kernel"], np.float64)[:, :, 0]  # (5, 5, C)
    padded = np.pad(qkv, ((0, 0), (2, 2), (2, 2), (0, 0)))
    agg = sum(padded[:, i:i + h, j:j + w] * dw[i, j] for i in range(5) for j in range(5))
    pw = np.asarray(params["aggreg_0"]["pw"]["kernel"], np.float64)[0, 0]  # (d, 3 heads * d): one block per group
    agg = np.concatenate([agg[..., g * d:(g + 1) * d] @ pw[:, g * d:(g + 1) * d] for g in range(3 * heads)], -1)
    outs = []
    for source in (qkv, agg):
        for g in range(heads):
            t = source[..., 3 * d * g:3 * d * (g + 1)].reshape(b, 1, h * w, 3 * d)
            outs.append(_direct_attention(t[..., :d], t[..., d:2 * d], t[..., 2 * d:])[:, 0].reshape(b, h, w, d))
    y = np.concatenate(outs, -1) @ np.asarray(params["proj"]["linear"]["kernel"], np.float64)[0, 0]
    bn, st = params["proj"]["bn"], stats["proj"]["bn"]
    return (y - np.asarray(st["mean"])) / np.sqrt(np.asarray(st["var"]) + bn_eps) * np.asarray(bn["scale"]) + \
        np.asarray(bn["bias"])


def test_attention_layer_matches_a_direct_numpy_formulation():
    """Catches a wrong channel-to-head layout, aggregation grouping or concatenation order, apart from timm."""
    layer = ReluLinearAttention(24, 8, Conv2d, Conv2dBn)
    x = np.random.default_rng(1).standard_normal((2, 5, 7, 24)).astype(np.float32)
    variables = layer.init(jax.random.key(0), x)
    rng = np.random.default_rng(2)
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32)
                                       if a.ndim == 1 else a, variables)  # BatchNorm away from the identity
    with depthwise_impl("native"):
        got = np.asarray(layer.apply(variables, x))
    expected = _numpy_layer(variables["params"], variables["batch_stats"], x, 8)
    assert got.shape == (2, 5, 7, 24)
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


@pytest.mark.reference
@pytest.mark.parametrize("name", NAMES)
def test_variant_tables_match_timms_modules(name):
    """Widths, block counts and head widths of the table against timm's built model (stem, stages, attention heads
    and the head's layers), and the deploy form's parameters: timm's minus one per BatchNorm channel (each BatchNorm's
    scale and shift become one conv bias)."""
    import timm
    import torch

    from reference import twin_model

    twin = twin_model(f"timm:{name}")
    table = VARIANTS[name][0]
    assert table["stem"].width == twin.stem.in_conv.conv.out_channels
    assert table["stem"].depth == sum(n.startswith("res") for n, _ in twin.stem.named_children())
    for s, stage in zip(table["stages"], twin.stages, strict=True):
        blocks = list(stage.blocks)
        assert s.width == blocks[0].main.point_conv.conv.out_channels
        mixers = [m for m in stage.modules() if isinstance(m, timm.models.efficientvit_mit.LiteMLA)]
        assert s.attention == bool(mixers)
        assert len(blocks) == (s.depth + 1 if s.attention else s.depth)
        for m in mixers:
            assert m.dim == table["head_dim"] and m.aggreg[0][0].kernel_size == (5, 5)
    assert tuple(table["head_widths"]) == (twin.head.in_conv.conv.out_channels, twin.head.classifier[0].out_features)
    module = zoo.create_model(name, deploy=True)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
    bn_channels = sum(m.num_features for m in twin.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert count_params(params) == sum(p.numel() for p in twin.parameters()) - bn_channels


@pytest.mark.reference
@pytest.mark.parametrize("name", NAMES)
def test_key_map_covers_every_timm_key(name):
    """Every timm key lands on a zoo variable of its shape and every zoo variable is reached (conversion raises for
    an unmapped or mis-shaped key)."""
    from reference import twin_model

    state = {k: v.numpy() for k, v in twin_model(f"timm:{name}").state_dict().items()}
    module = zoo.create_model(name)
    target = flatten_variables(jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))))
    converted = convert_state_dict(state, timm_rename(module), target)
    assert set(converted) == set(target)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(zoo model, images, timm logits, timm stage maps NHWC) for efficientvit_b0 with every BatchNorm perturbed and
    the head's LayerNorm affine random, through torch.save -> zoo.load, at the odd size HW."""
    import torch

    from reference import twin_model

    twin = twin_model("timm:efficientvit_b0")
    perturb_batchnorm(twin)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ln = twin.head.classifier[1]
        ln.weight.copy_(torch.rand(ln.weight.shape, generator=g) + 0.5)
        ln.bias.copy_(torch.randn(ln.bias.shape, generator=g) * 0.5)
    x = random_images(2, HW)
    scale_classifier_to_trained_spread(twin, torch.from_numpy(x.transpose(0, 3, 1, 2)))
    model, logits, stages = converted_timm_twin(twin, "efficientvit_b0", x, tmp_path_factory.mktemp("efficientvit_mit"))
    return model, x, logits, stages


def _logits_and_features(module, variables, x):
    with depthwise_impl("native"):
        logits = jax.jit(lambda v, x: module.apply(v, x))(variables, x)
        feats = jax.jit(lambda v, x: module.apply(v, x, features=True))(variables, x)
    return np.asarray(logits), {k: np.asarray(f) for k, f in feats.items()}


@pytest.mark.parity
def test_converted_weights_match_timm_on_an_odd_input(converted):
    model, x, expected, stages = converted
    assert 1.0 < np.abs(expected).max() < 100  # a trained model's logit scale, where 1e-4 tests the conversion
    logits, feats = _logits_and_features(model.module, model.variables, x)
    error = np.abs(logits - expected).max()
    print(f"efficientvit_b0 {HW}: max|zoo - timm| logits {error:.2e}")
    assert error <= 1e-4
    assert feats["stem"].shape[1:3] == (49, 65)
    for i, theirs in enumerate(stages):
        ours = feats[f"stages_{i}"]
        assert ours.shape == theirs.shape, i
        assert np.abs(ours - theirs).max() <= 1e-5 * max(1.0, np.abs(theirs).max()), i


@pytest.mark.parity
def test_deploy_form_matches_timm(converted):
    """`compress.deploy`: every conv+BN one conv with a bias; the LayerNorm and the bias-only convs stay."""
    model, x, expected, _ = converted
    fast = deploy(model)
    assert fast.module.deploy and not jax.tree_util.tree_leaves(fast.variables.get("batch_stats", {}))
    params = fast.variables["params"]
    assert set(params["stem"]["in_conv"]["linear"]) == {"kernel", "bias"}
    assert set(params["stages_2"]["blocks_1"]["context_module"]) == {"qkv", "aggreg_0", "proj"}
    assert set(params["head"]) == {"in_conv", "hidden", "ln", "fc"}
    logits, feats = _logits_and_features(fast.module, fast.variables, x)
    error = np.abs(logits - expected).max()
    print(f"efficientvit_b0 deploy form {HW}: max|zoo - timm| logits {error:.2e}")
    assert error <= 1e-4
    assert feats["pre_logits"].shape == (2, 1280)
