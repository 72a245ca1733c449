"""EfficientFormer: what the generic tests leave out. The pooling token mixer against a direct computation of
PyTorch's `count_include_pad=False` average; the attention-bias index against timm's; what another input size does
(an error naming the sizes the biases fit); the distilled head's eval output and its two classifiers; the deploy
form's layer-scale folds with layer scales off their 1e-5 init; and converted timm weights against timm with every
attention bias and layer scale off its init.

The generic tests cover the rest (`test_parity.py` converts every variant, but with timm's attention biases at zero
and its layer scales at 1e-5, where the residual branches barely reach the logits; `test_contract.py` checks the
deploy form with the same layer scales). The fp32 sweep of `test_export_models.py` exports the pooling at every
border of 16x16 to 2x2 maps and checks the file's logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import zoo
from compress.deploy import deploy, deploy_param_count
from zoo.counting import count_params
from zoo.layers.attention import attention_bias_index
from zoo.layers.pooling import avg_pool_excluding_padding
from zoo.models.backbone import PRE_LOGITS
from zoo.models.efficientformer import VARIANTS, DistilledLinearHead
from zoo.registry import UnknownModelError

from reference import random_images, random_variables

NAME = "efficientformer_l1"


def _direct_pool(x: np.ndarray, window: int) -> np.ndarray:
    """Every pixel's mean over the window positions that lie inside the map, one window at a time."""
    n, h, w, c = x.shape
    half = window // 2
    out = np.zeros_like(x, np.float64)
    for i in range(h):
        for j in range(w):
            patch = x[:, max(i - half, 0):i + half + 1, max(j - half, 0):j + half + 1]
            out[:, i, j] = patch.reshape(n, -1, c).mean(1)
    return out


@pytest.mark.parametrize("hw,window", [((7, 9), 3), ((1, 1), 3), ((2, 3), 3), ((6, 5), 5), ((4, 4), 1)])
def test_pooling_divides_by_the_pixels_inside_the_map(hw, window):
    x = np.random.default_rng(0).standard_normal((2, *hw, 4)).astype(np.float32)
    got = np.asarray(avg_pool_excluding_padding(jnp.asarray(x), window))
    np.testing.assert_allclose(got, _direct_pool(x, window), atol=1e-6, rtol=0)
    assert got.shape == x.shape


def test_pooling_rejects_an_even_window():
    with pytest.raises(ValueError, match="odd window"):
        avg_pool_excluding_padding(jnp.zeros((1, 4, 4, 2)), 2)


@pytest.mark.reference
def test_attention_bias_index_matches_timm():
    from timm.models.efficientformer import Attention

    np.testing.assert_array_equal(attention_bias_index((7, 7)), Attention(dim=64).attention_bias_idxs.numpy())


def _variables(module, hw: int) -> dict:
    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, hw, hw, 3))))


def test_another_input_size_names_the_sizes_the_biases_fit():
    module = zoo.create_model(NAME)
    at224 = _variables(module, 224)
    biases = at224["params"]["stages_3"]["blocks_4"]["token_mixer"]["attention_biases"]
    assert biases.shape == (8, 49)  # timm's table: the 7x7 map of a 224x224 input
    for hw in (193, 224):  # every input whose stride-32 map is 7x7 fits
        jax.eval_shape(lambda v, x: module.apply(v, x), at224, jax.ShapeDtypeStruct((1, hw, hw, 3), jnp.float32))
    for shape in ((1, 160, 160, 3), (1, 256, 256, 3), (1, 224, 192, 3)):
        with pytest.raises(ValueError, match=r"biases are for a 7x7 map, which inputs of 193 to 224 pixels a side"):
            jax.eval_shape(lambda v, x: module.apply(v, x), at224, jax.ShapeDtypeStruct(shape, jnp.float32))
    # created at another size, the biases are sized for it (untrained)
    at160 = _variables(module, 160)
    assert at160["params"]["stages_3"]["blocks_4"]["token_mixer"]["attention_biases"].shape == (8, 25)


def _off_init(variables: dict, seed: int, gamma=(0.05, 0.2)) -> dict:
    """Layer scales drawn from `gamma`, attention biases N(0, 1), every other bias and the BatchNorm statistics off
    their inits: what the generic tests leave at their inits."""
    rng = np.random.default_rng(seed)
    out = {}
    for col, tree in variables.items():
        flat = traverse_util.flatten_dict(jax.device_get(tree))
        for k, v in flat.items():
            if k[-1] == "gamma":
                flat[k] = rng.uniform(*gamma, v.shape).astype(np.float32)
            elif k[-1] == "attention_biases":
                flat[k] = rng.standard_normal(v.shape).astype(np.float32)
            elif k[-1] == "bias":
                flat[k] = (rng.standard_normal(v.shape) * 0.1).astype(np.float32)
            elif col == "batch_stats":
                flat[k] = (rng.uniform(0.5, 1.5, v.shape) if k[-1] == "var"
                           else rng.standard_normal(v.shape) * 0.1).astype(np.float32)
        out[col] = traverse_util.unflatten_dict(flat)
    return out


@pytest.fixture(scope="module")
def random_l1():
    """(module, variables, images, logits, backbone dict) of L1 at 64x64: layer scales, attention biases and
    BatchNorm statistics off their inits, and two different classifiers (so that a head using one only shows)."""
    module = zoo.create_model(NAME)
    x = random_images(2, (64, 64), seed=3)
    variables = _off_init(random_variables(module, x.shape), seed=1)
    rng = np.random.default_rng(5)
    for fc in variables["params"]["head"]["fc"].values():
        fc["kernel"] = (rng.standard_normal(fc["kernel"].shape) * 0.05).astype(np.float32)
        fc["bias"] = rng.standard_normal(fc["bias"].shape).astype(np.float32)
    logits, feats = jax.jit(lambda v, x: (module.apply(v, x), module.apply(v, x, features=True)))(variables, x)
    return module, variables, x, np.asarray(logits), feats


def test_eval_output_is_the_mean_of_the_two_classifiers(random_l1):
    _, variables, _, logits, feats = random_l1
    y, y_dist = DistilledLinearHead.both_logits(variables["params"]["head"], feats[PRE_LOGITS])
    assert np.abs(np.asarray(y - y_dist)).max() > 1.0
    np.testing.assert_allclose(logits, np.asarray((y + y_dist) / 2), atol=1e-5, rtol=0)


def test_deploy_folds_layer_scales_and_averages_the_classifiers(random_l1):
    module, variables, x, expected, _ = random_l1
    shape = (1, *x.shape[1:])
    fast, fv = deploy((module, variables), input_shape=shape)
    params = fv["params"]
    assert fast.base.deploy and not fv.get("batch_stats")  # re-parameterized, then BatchNorm-folded (a wrapper)
    assert set(params["stages_3"]["blocks_4"]) == {"norm1", "token_mixer", "norm2", "mlp"}  # ls1, ls2 folded
    assert set(params["stages_0"]["blocks_0"]) == {"ls1", "mlp"}  # the pooling branch's scale stays
    assert set(params["head"]) == {"fc"} and params["head"]["fc"]["kernel"].shape == (448, 1000)
    assert count_params(params) == deploy_param_count(module, shape)
    got = np.asarray(jax.jit(fast.apply)(fv, x))
    np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, np.abs(expected).max()), rtol=0)


@pytest.mark.parity
def test_converted_timm_weights_match_timm_with_biases_and_scales_off_init(tmp_path):
    import torch

    from reference import perturb_batchnorm, twin_model

    twin = twin_model(f"timm:{NAME}")
    perturb_batchnorm(twin)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if n.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif n.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.4 + 0.2)
            elif n.startswith(("head.", "head_dist.")):  # logits of a trained model's spread, the two heads apart
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim == 2 else 1.0))
    x = random_images(1, (224, 224), seed=6)
    x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2))
    with torch.inference_mode():
        expected = twin(x_nchw).numpy()
    path = tmp_path / "twin.pth"
    torch.save(twin.state_dict(), path)  # with timm's persistent `attention_bias_idxs` buffer
    model = zoo.load(NAME, weights=str(path), layout="timm", progress=False)
    got = np.asarray(model(x))
    error = np.abs(got - expected).max()
    print(f"{NAME} 224x224, attention biases and layer scales off init: max|zoo - timm| {error:.2e}, "
          f"logits up to {np.abs(expected).max():.1f}")
    assert 1.0 < np.abs(expected).max() < 100 and error <= 1e-4


@pytest.mark.reference
def test_every_timm_tag_is_registered_and_a_wrong_tag_is_named():
    import timm

    ours = set(zoo.list_models("efficientformer_l*", pretrained=True))
    assert ours == set(timm.list_models("efficientformer_l*", pretrained=True))
    assert {n.split(".")[0] for n in ours} == set(VARIANTS)
    with pytest.raises(UnknownModelError, match="no pretrained tag 'dist_in1k'"):
        zoo.load(f"{NAME}.dist_in1k", progress=False)
