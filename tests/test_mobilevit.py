"""MobileViT: patch unfold/fold order, timm's bilinear resize of odd-sized maps, and logits against timm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import zoo.models.mobilevit as mv
from zoo.layers.patches import fold, resize_bilinear, unfold
from zoo.convert import convert_state_dict, flatten_variables

from reference import LazyModule, torch

F = LazyModule("torch.nn.functional")
pytestmark = pytest.mark.reference  # against torch's own ops and timm


def _timm_unfold(x: torch.Tensor, p: int) -> torch.Tensor:
    """timm MobileVitBlock's unfold, NCHW (B, C, H, W) -> (B * P, N, C), restated as one permute."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 3, 5, 2, 4, 1)  # (B, ph, pw, nh, nw, C)
    return x.reshape(b * p * p, (h // p) * (w // p), c)


def test_unfold_order_and_fold_inverse():
    x = np.random.RandomState(0).randn(2, 6, 10, 5).astype(np.float32)  # NHWC, 3x5 patches of 2x2
    seq = np.asarray(unfold(jnp.asarray(x), 2))
    ref = _timm_unfold(torch.from_numpy(x.transpose(0, 3, 1, 2)), 2).numpy()
    np.testing.assert_array_equal(seq, ref)
    np.testing.assert_array_equal(np.asarray(fold(jnp.asarray(seq), 2, (6, 10), 2)), x)


@pytest.mark.parametrize("src,dst", [((7, 5), (8, 6)), ((8, 6), (7, 5)), ((3, 13), (4, 14))])
def test_resize_matches_torch_bilinear(src, dst):
    x = np.random.RandomState(1).randn(2, *src, 3).astype(np.float32)
    got = np.asarray(resize_bilinear(jnp.asarray(x), dst))
    ref = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=dst, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(got, ref.numpy().transpose(0, 2, 3, 1), atol=1e-5)


@pytest.mark.parity
def test_xxs_logits_match_timm():
    """Whole mobilevit_xxs with converted random weights at 80x80: the MobileViT blocks see 10x10 maps (25 patches),
    5x5 and 3x3 (both resized to even sizes around the transformer)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    tm = timm.create_model("mobilevit_xxs", pretrained=False).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial norms, so a swapped scale/bias or mean/var shows
        for m in tm.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        tm.head.fc.weight.mul_(10.0)  # logits of order 10 rather than 1

    model = mv.MobileViT(stages=mv.XXS, num_features=320)
    x = np.random.RandomState(2).randn(2, 3, 80, 80).astype(np.float32)
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), xj)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    flat = convert_state_dict(sd, mv.timm_rename(model), flatten_variables(shapes))
    assert set(flat) == set(flatten_variables(shapes))
    variables = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})

    got = np.asarray(jax.jit(model.apply)(variables, xj))
    with torch.no_grad():
        ref = tm(torch.from_numpy(x)).numpy()
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
