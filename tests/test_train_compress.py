"""The `compress` section of a run config: pruning, 2:4 sparsity and distillation inside `fit`, pruned runs reload by
themselves, a pruned run continues with QAT through `model.init_from`, and the result exports to int8 (the recipe)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import train
import zoo
from compress.sparsity import check_n_m
from zoo.tree import flatten
from zoo.counting import count_macs

from reference import random_variables
from test_train_support import random_digits, tiny_config

NAME, SIZE = "mobilenetv3_small_050", 32


@pytest.fixture(scope="module")
def base_model():
    module = zoo.create_model(NAME, num_classes=10)
    variables = random_variables(module, (1, SIZE, SIZE, 3))
    # distinct BN scales, so the ranking that pruning uses is not a tie
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: np.abs(rng.normal(1.0, 0.5, v.shape)).astype(v.dtype)
        if str(getattr(p[-1], "key", "")) == "scale" else v, variables)
    cfg = zoo.registry.get_entry(NAME).cfg.replace(num_classes=10, input_size=(SIZE, SIZE))
    return zoo.Model(module, variables, cfg)


def _nm_kernels(params) -> dict:
    return {k: v for k, v in flatten(params).items() if k.endswith("kernel") and v.shape[-2] % 4 == 0
            and v.size >= 1024}


def test_recipe_prune_distill_sparsify_then_qat_then_int8_export(tmp_path, base_model):
    """The dense run teaches its own pruned, 2:4-sparse copy; QAT continues from that run; the result exports to an
    all-int8 TFLite file that keeps the 2:4 pattern."""
    import export
    from export.sparsity_tflite import check_tflite_n_m

    images, labels = random_digits(128)
    dense = tmp_path / "dense"
    cfg = tiny_config(dense, 4)
    cfg.data.image_size = SIZE
    teacher = train.fit(cfg, model=base_model, train_data=(images, labels))

    run = tmp_path / "pruned"
    cfg = tiny_config(run, 4, compress__prune_ratio=0.5, compress__sparsity="2:4", distill__teacher=str(dense))
    cfg.data.image_size, cfg.model.name, cfg.model.init_from = SIZE, NAME, str(dense)
    result = train.fit(cfg, train_data=(images, labels))
    assert np.isfinite(result.history[-1]["kd_loss"])  # the teacher took part

    shape = (1, SIZE, SIZE, 3)
    assert count_macs(result.model.module, result.model.variables, shape) < \
        0.8 * count_macs(teacher.model.module, teacher.model.variables, shape)
    # the returned weights are the EMA (tiny_config keeps one): masked like the trained ones
    for params in (result.state.params, result.model.variables["params"]):
        kernels = _nm_kernels(params)
        assert kernels and all(check_n_m(np.asarray(v), 2, 4, axis=-2) for v in kernels.values())

    # the run records its pruned architecture: load_run rebuilds it without being given the model
    again = train.load_run(run)
    x = np.random.default_rng(0).normal(size=(8, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(result.model(x)), atol=1e-5)

    # continue the pruned, sparse run with quantization-aware training (sparsity kept on)
    qcfg = tiny_config(tmp_path / "qat", 2, compress__qat=True, compress__sparsity="2:4")
    qcfg.data.image_size, qcfg.model.name, qcfg.model.init_from = SIZE, NAME, str(run)
    qat = train.fit(qcfg, train_data=(images, labels))
    reloaded = train.load_run(tmp_path / "qat")
    np.testing.assert_allclose(np.asarray(reloaded(x)), np.asarray(qat.model(x)), atol=1e-5)

    res = export.to_tflite(qat.model, quantization="int8", representative_data=x, progress=False)
    assert res.ops.quantized_activations and res.ops.float_islands == () and not res.ops.flex_ops
    sparse = [r for r in check_tflite_n_m(res.content, "2:4") if r.sparsity >= 0.5]
    assert sparse and all(r.ok for r in sparse)


def test_bad_compress_settings_fail_before_training(tmp_path, base_model):
    images, labels = random_digits(64)
    with pytest.raises(train.ConfigError, match="prune_ratio"):
        train.fit(tiny_config(tmp_path / "a", 2, compress__prune_ratio=1.5), model=base_model,
                  train_data=(images, labels))
    with pytest.raises(train.ConfigError, match="compress.sparsity"):
        train.fit(tiny_config(tmp_path / "b", 2, compress__sparsity="2:4", compress__sparsity_rules=("nothing_here",)),
                  model=base_model, train_data=(images, labels))
