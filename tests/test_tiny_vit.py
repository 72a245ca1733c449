"""TinyViT: parameter counts of both forms against timm's (the deploy form against timm's ConvNorm fusion), converted
timm weights against timm on a non-square input whose maps are not whole windows (zero padding, maps smaller than a
window), with every attention bias and LayerNorm off its init, for the training and the deploy form; the input-size
rule (any size runs; biases of another window raise); and the pretrained tags against timm's.

`tests/test_parity.py` converts every variant too, but at 224x224 only, where every map is a whole number of windows
(no padding), and with timm's attention biases at their zero init (the bias indexing is not tested there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from compress.deploy import deploy, deploy_param_count
from zoo.counting import count_params
from zoo.layers.conv import depthwise_impl
from zoo.models.tiny_vit import VARIANTS, window_partition, window_reverse
from zoo.registry import get_entry

from quick_compile import quick_compile
from reference import converted_timm_twin, perturb_batchnorm, random_images, scale_classifier_to_trained_spread

# timm 1.0.31 with 1000 classes (its default configs have ImageNet-22k's 21,841): parameters, and after its fusion
# (`timm.utils.reparameterize_model`: every ConvNorm one conv with a bias); 5M as ../shared/reference/timm_counts.csv
TIMM_PARAMS = {
    "tiny_vit_5m_224": (5_392_764, 5_387_836),
    "tiny_vit_11m_224": (10_996_972, 10_990_540),
    "tiny_vit_21m_224": (21_198_568, 21_189_400),
}
# maps 24x40 (stage 0), 12x20 (stage 1, windows of 7: padded to 14x21), 6x10 (windows of 14: padded to 14x14), 3x5
# (windows of 7: padded to 7x7): every attention stage pads, in both directions, by different amounts, and the last
# two maps are smaller than one window
HW = (96, 160)


def test_registered_variants_are_timms():
    assert set(VARIANTS) == set(TIMM_PARAMS) == set(zoo.list_models("tiny_vit_*"))


@pytest.mark.parametrize("name", list(TIMM_PARAMS))
def test_param_counts_match_timm_both_forms(name):
    """Abstract shapes only; the parameters do not depend on the input size (module doc of zoo.models.tiny_vit)."""
    module = zoo.create_model(name)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
    assert (count_params(params), deploy_param_count(module, (1, 32, 32, 3))) == TIMM_PARAMS[name]


def test_window_partition_round_trip_and_order():
    x = jnp.arange(2 * 14 * 21 * 3, dtype=jnp.float32).reshape(2, 14, 21, 3)
    w = window_partition(x, 7)
    assert w.shape == (2 * 2 * 3, 49, 3)
    np.testing.assert_array_equal(w[7], x[1, :7, 7:14].reshape(49, 3))  # image 1 (6 windows each), row 0, column 1
    np.testing.assert_array_equal(window_reverse(w, 7, 2, 14, 21), x)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(zoo model, images, timm logits, timm stage maps NHWC) for tiny_vit_5m_224 (1000 classes) with every
    BatchNorm perturbed, random attention biases (N(0, 1), the scale of q.k / sqrt(d)) and every LayerNorm's scale and
    shift random, through torch.save -> zoo.load."""
    import timm
    import torch

    torch.manual_seed(0)
    twin = timm.create_model("tiny_vit_5m_224", pretrained=False, num_classes=1000).eval()
    perturb_batchnorm(twin)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if n.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=g))
        for m in twin.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.4 + 0.8)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    x = random_images(2, HW)
    scale_classifier_to_trained_spread(twin, torch.from_numpy(x.transpose(0, 3, 1, 2)))
    model, logits, stages = converted_timm_twin(twin, "tiny_vit_5m_224", x, tmp_path_factory.mktemp("tiny_vit"))
    return model, x, logits, stages


def _logits_and_features(module, variables, x):
    """Logits and the named outputs from one jitted forward of the backbone (native depthwise and `quick_compile`:
    compiles faster, the same numbers up to float rounding), the logits the head's Linear of `pre_logits` (the head
    has nothing else after its LayerNorm)."""
    with depthwise_impl("native"), quick_compile():
        feats = jax.jit(lambda v, x: module.apply(v, x, features=True))(variables, x)
    fc = variables["params"]["head"]["fc"]
    logits = np.asarray(feats["pre_logits"], np.float64) @ np.asarray(fc["kernel"], np.float64) + np.asarray(fc["bias"])
    return logits, {k: np.asarray(f) for k, f in feats.items()}


@pytest.mark.parity
def test_converted_weights_match_timm_with_padded_windows(converted):
    model, x, expected, stages = converted
    assert 1.0 < np.abs(expected).max() < 100  # a trained model's logit scale, where 1e-4 tests the conversion
    biases = model.variables["params"]["stages_2"]["blocks_0"]["attn"]["attention_biases"]
    assert biases.shape == (5, 14 * 14) and np.abs(np.asarray(biases)).max() > 1.0
    logits, feats = _logits_and_features(model.module, model.variables, x)
    error = np.abs(logits - expected).max()
    print(f"tiny_vit_5m_224 {HW}: max|zoo - timm| logits {error:.2e}")
    assert error <= 1e-4
    for i, theirs in enumerate(stages):
        ours = feats[f"stages_{i}"]
        assert ours.shape == theirs.shape == (2, HW[0] // 4 >> i, HW[1] // 4 >> i, ours.shape[-1])
        assert np.abs(ours - theirs).max() <= 1e-5 * max(1.0, np.abs(theirs).max()), i
    assert feats["patch_embed/conv1"].shape == (2, HW[0] // 2, HW[1] // 2, 32)


@pytest.mark.parity
def test_deploy_form_matches_timm(converted):
    """`compress.deploy` (every conv+BN one conv with a bias; LayerNorms, attention and Linears unchanged) against
    timm on the same padded input."""
    model, x, expected, _ = converted
    fast = deploy(model)
    assert fast.module.deploy and not jax.tree_util.tree_leaves(fast.variables.get("batch_stats", {}))
    params = fast.variables["params"]
    assert set(params["stages_1"]["blocks_0"]["local_conv"]) == {"linear"}
    assert set(params["stages_1"]["blocks_0"]["local_conv"]["linear"]) == {"kernel", "bias"}
    assert count_params(params) == TIMM_PARAMS["tiny_vit_5m_224"][1]
    logits, _ = _logits_and_features(fast.module, fast.variables, x)
    error = np.abs(logits - expected).max()
    print(f"tiny_vit_5m_224 deploy form {HW}: max|zoo - timm| logits {error:.2e}")
    assert error <= 1e-4


def test_any_input_size_runs_and_biases_of_another_window_raise():
    """The bias tables are sized by the window, not the input: variables made at 224x224 run at other sizes (windows
    padded), non-square included; variables whose tables were made for other windows raise naming the window."""
    module = zoo.create_model("tiny_vit_5m_224")
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    for hw in ((96, 320), (64, 64)):
        out = jax.eval_shape(lambda v: module.apply(v, jnp.zeros((1, *hw, 3))), variables)
        assert out.shape == (1, 1000), hw
    wide = zoo.create_model("tiny_vit_5m_224", window_sizes=(12, 24, 12))
    with pytest.raises(ValueError, match=r"stages_1/blocks_0/attn': its biases are for a 7x7 window, but the model "
                                         r"attends in 12x12 windows"):
        jax.eval_shape(lambda v: wide.apply(v, jnp.zeros((1, 224, 224, 3))), variables)
    with pytest.raises(ValueError, match="one per attention stage"):
        zoo.create_model("tiny_vit_5m_224", window_sizes=(7, 14)).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.reference
def test_pretrained_tags_are_timms_imagenet_1k_ones():
    """Every tag timm ships with a 1000-class head (its ImageNet-1k training and the ImageNet-22k distilled
    fine-tunes; `dist_in22k`, 21,841 classes, is left out), and the distilled fine-tune reported above its in1k
    counterpart (`test_pretrained_metadata.py` compares each tag's fields)."""
    import timm

    for name in VARIANTS:
        ours = {p.tag: p for p in get_entry(name).pretrained}
        theirs = {t.split(".", 1)[1] for t in timm.list_pretrained(f"{name}.*")
                  if timm.models.get_pretrained_cfg(t).num_classes == 1000}
        assert set(ours) == theirs == {"in1k", "dist_in22k_ft_in1k"}, name
        assert ours["dist_in22k_ft_in1k"].top1 > ours["in1k"].top1
        assert all(p.num_classes == 1000 and p.crop_pct == 0.95 for p in ours.values())
