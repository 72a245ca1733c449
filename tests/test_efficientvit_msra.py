"""EfficientViT (MSRA): parameter counts of both forms against timm (the deploy form against timm's BatchNorm fusion,
which the generic tests do not compare), the attention windows and bias shapes that `img_size` gives against timm's,
the bias index against timm's, converted timm weights with random attention biases against timm on an input whose
maps are padded into windows, the deploy form against timm at 224x224, and the errors for a wrong `img_size`.

`tests/test_parity.py` converts every variant too, but with timm's attention biases at their zero init (so the bias
indexing is not tested there) and at 224x224 only (where no map is padded).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from compress.deploy import deploy
from zoo.counting import count_params
from zoo.layers.attention import attention_bias_index
from zoo.layers.conv import depthwise_impl
from zoo.models.efficientvit_msra import VARIANTS, stage_windows
from zoo.weights.errors import WeightsMismatchError

from reference import perturb_batchnorm, random_images, scale_classifier_to_trained_spread

# timm 1.0.31: parameters after its BatchNorm fusion (timm.utils.model.reparameterize_model), as
# ../shared/reference/timm_counts.csv lists them (`params_reparam`); the training form's are `test_models.py`'s
TIMM_FUSED_PARAMS = {
    "efficientvit_m0": 2_334_916,
    "efficientvit_m1": 2_964_256,
    "efficientvit_m2": 4_168_338,
    "efficientvit_m3": 6_875_890,
    "efficientvit_m4": 8_776_340,
    "efficientvit_m5": 12_436_260,
}
SMALL = (1, 64, 64, 3)  # parameters do not depend on the input (module doc of zoo.models.efficientvit_msra)
PADDED_HW = (96, 128)  # maps 6x8, 3x4, 2x2: every stage's map is padded into 7x7, 7x7 and 4x4 windows


def _params(module, shape=SMALL):
    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape)))["params"]


def test_registered_variants_are_timms():
    assert set(VARIANTS) == set(TIMM_FUSED_PARAMS) == set(zoo.list_models("efficientvit_m*"))


@pytest.mark.parametrize("name", list(TIMM_FUSED_PARAMS))
def test_deploy_param_counts_match_timms_fusion(name):
    assert count_params(_params(zoo.create_model(name, deploy=True))) == TIMM_FUSED_PARAMS[name]


@pytest.mark.reference
@pytest.mark.parametrize("img_size", [160, 288])  # windows (7, 5, 3) and (7, 7, 5); 224 loads in the parity tests
def test_windows_and_bias_shapes_follow_img_size_as_timm(img_size):
    import timm

    twin = timm.create_model("efficientvit_m0", img_size=img_size)
    theirs = tuple(stage.blocks[0].mixer.m.attn.resolution for stage in twin.stages)
    assert stage_windows(img_size, 3) == theirs
    ours = _params(zoo.create_model("efficientvit_m0", img_size=img_size))
    for i, stage in enumerate(twin.stages):
        for j, block in enumerate(stage.blocks):
            shape = ours[f"stages_{i}"][f"blocks_{j}"]["mixer"]["attn"]["attention_biases"].shape
            assert shape == tuple(block.mixer.m.attn.attention_biases.shape), (i, j)


@pytest.mark.reference
@pytest.mark.parametrize("window", [7, 4, 2])
def test_attention_bias_index_matches_timm(window):
    from timm.models.efficientvit_msra import CascadedGroupAttention

    ref = CascadedGroupAttention(dim=32, key_dim=8, num_heads=2, resolution=window)
    np.testing.assert_array_equal(attention_bias_index((window, window)), ref.attention_bias_idxs.numpy())


@pytest.mark.parametrize("img_size", [8, 15, 224.0, (224, 224), True])
def test_img_size_that_sets_no_window_is_a_clear_error(img_size):
    module = zoo.create_model("efficientvit_m0", img_size=img_size)
    with pytest.raises(ValueError, match=r"img_size .* must be an int >= 16"):
        jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(SMALL)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(zoo model, checkpoint path, {hw: (images, timm logits, timm stage maps NHWC)}) for efficientvit_m0 with every
    attention bias random (N(0, 1), the scale of q.k / sqrt(d)) and every BatchNorm perturbed, through torch.save ->
    zoo.load."""
    import torch

    from reference import twin_model

    twin = twin_model("timm:efficientvit_m0")
    perturb_batchnorm(twin)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if n.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=g))
    x224 = random_images(2, (224, 224))
    scale_classifier_to_trained_spread(twin, torch.from_numpy(x224.transpose(0, 3, 1, 2)))
    runs = {}
    for hw, x in (((224, 224), x224), (PADDED_HW, random_images(2, PADDED_HW, seed=1))):
        x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2))
        with torch.inference_mode():
            logits = twin(x_nchw).numpy()
            _, stages = twin.forward_intermediates(x_nchw)
        runs[hw] = (x, logits, [s.numpy().transpose(0, 2, 3, 1) for s in stages])
    path = tmp_path_factory.mktemp("efficientvit_msra") / "twin.pth"
    torch.save(twin.state_dict(), path)
    model = zoo.load("efficientvit_m0", weights=str(path), layout="timm", progress=False)
    return model, path, runs


def _logits_and_stages(module, variables, x):
    """Logits and the outputs of stages 0 and 1 from one jitted forward (native depthwise: the same numbers as the
    CPU default's shifted slices, compiled several times faster)."""
    wanted = ("stages_0", "stages_1")

    def run(v, x):
        logits, state = module.apply(v, x, capture_intermediates=lambda m, method: method == "__call__" and
                                     m.name in wanted, mutable=["intermediates"])
        return logits, [state["intermediates"][n]["__call__"][0] for n in wanted]

    with depthwise_impl("native"):
        logits, stages = jax.jit(run)(variables, x)
    return np.asarray(logits), [np.asarray(s) for s in stages]


@pytest.mark.parity
def test_converted_timm_weights_match_timm_on_padded_windows(converted):
    model, _, runs = converted
    x, expected, stages = runs[PADDED_HW]
    assert 1.0 < np.abs(expected).max() < 100  # a trained model's logit scale, where 1e-4 tests the conversion
    logits, ours = _logits_and_stages(model.module, model.variables, x)
    error = np.abs(logits - expected).max()
    print(f"efficientvit_m0 {PADDED_HW}: max|zoo - timm| logits {error:.2e}")
    assert error <= 1e-4
    for i, theirs in enumerate(stages[:2]):
        assert ours[i].shape == theirs.shape
        assert np.abs(ours[i] - theirs).max() <= 1e-5 * max(1.0, np.abs(theirs).max()), i


@pytest.mark.parity
def test_deploy_form_matches_timm(converted):
    """`compress.deploy` (every conv+BN one conv, the head's BatchNorm folded into its Linear) against timm itself,
    at 224x224 (the training form there, with biases at zero: `test_parity.py`)."""
    model, _, runs = converted
    x, expected, _ = runs[224, 224]
    fast = deploy(model)
    assert fast.module.deploy and not jax.tree_util.tree_leaves(fast.variables.get("batch_stats", {}))
    params = fast.variables["params"]
    attn = params["stages_0"]["blocks_0"]["mixer"]["attn"]
    assert set(attn["qkvs_0"]) == {"linear"} and set(attn["qkvs_0"]["linear"]) == {"kernel", "bias"}
    assert attn["attention_biases"].shape == (4, 49)
    assert set(params["head"]) == {"fc"} and params["head"]["fc"]["kernel"].shape == (192, 1000)
    assert count_params(params) == TIMM_FUSED_PARAMS["efficientvit_m0"]
    logits, _ = _logits_and_stages(fast.module, fast.variables, x)
    error = np.abs(logits - expected).max()
    print(f"efficientvit_m0 deploy form 224x224: max|zoo - timm| logits {error:.2e}")
    assert error <= 1e-4


@pytest.mark.parity
def test_weights_for_224_do_not_load_into_other_windows(converted):
    """img_size=288 makes stage 2's window 5x5: timm's 4x4-window biases are named with both shapes."""
    _, path, _ = converted
    with pytest.raises(WeightsMismatchError, match=r"attention_biases.*\(4, 16\).*\(4, 25\)"):
        zoo.load("efficientvit_m0", weights=str(path), layout="timm", progress=False, img_size=288)
