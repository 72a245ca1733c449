"""MobileNetV4's universal inverted bottleneck in the forms no registered variant builds, against timm's block.

`tests/test_parity.py` converts every registered variant (their strided 'uir' blocks all downsample in the middle
depthwise conv, none has layer scale); here a block downsampling in its start conv with the blur pool, and a residual
block with layer scale (MobileNetV4's hybrid models), take timm's weights and give its output.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from zoo.convert import convert_state_dict, flatten_variables
from zoo.layers.blocks import UniversalInvertedResidual
from zoo.layers.conv import Conv2d
from zoo.layers.norm import batch_norm
from zoo.tree import unflatten

from reference import random_images, random_variables

CASES = {  # id: (timm UniversalInvertedResidual kwargs, zoo kwargs)
    "start_only_strided_blur": (dict(dw_kernel_size_start=5, dw_kernel_size_mid=0, stride=2, aa_layer="blurpc",
                                     layer_scale_init_value=None),
                                dict(start_kernel=5, kernel=0, stride=2, aa="blur")),
    "extra_dw_layer_scale": (dict(dw_kernel_size_start=3, dw_kernel_size_mid=3, stride=1,
                                  layer_scale_init_value=0.5),
                             dict(start_kernel=3, kernel=3, stride=1, layer_scale=0.5)),
}


@pytest.mark.parity
@pytest.mark.parametrize("case", CASES)
def test_uir_block_matches_timm(case):
    import torch
    from timm.models._efficientnet_blocks import UniversalInvertedResidual as TimmUIR

    from reference import perturb_batchnorm

    timm_kwargs, zoo_kwargs = CASES[case]
    chs, exp = 16, 2.0
    twin = TimmUIR(chs, chs, exp_ratio=exp, **timm_kwargs).eval()
    perturb_batchnorm(twin)
    if twin.layer_scale is not None and hasattr(twin.layer_scale, "gamma"):
        with torch.no_grad():  # a gain that is not the init value, so its conversion shows
            twin.layer_scale.gamma.copy_(torch.linspace(0.5, 1.5, chs))
    block = UniversalInvertedResidual(chs, int(chs * exp), Conv2d, batch_norm(1e-5), **zoo_kwargs)
    x = random_images(2, (12, 12))[..., :1].repeat(chs, axis=-1) * np.linspace(0.5, 1.5, chs, dtype=np.float32)
    target = flatten_variables(random_variables(block, x.shape))
    state = {k: v.numpy() for k, v in twin.state_dict().items()}
    variables = unflatten(convert_state_dict(state, lambda p: p.replace(".", "/"), target))
    assert flatten_variables(variables) == target  # every zoo variable comes from the checkpoint
    out = np.asarray(block.apply(variables, jnp.asarray(x)))
    with torch.no_grad():
        ref = twin(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
