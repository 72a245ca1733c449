"""export.row_split: the first-row split of residual streams computes the same function, traces to full-int8 ops that
XNNPACK runs in one partition, and refuses patterns it cannot apply. Its gain is measured on MobileNetV2 with real
weights in tests/test_export_models.py (20.3 -> 22.1 dB on the first 64 crops)."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import pytest

import zoo
from export import to_tflite
from export.row_split import RowBands, split_rows, split_top_row
from export.weights import calibrate_batch_stats, random_variables

HW = (64, 64)
FAST = dict(equalization=False, bias_correction=False, progress=False)  # passes that do not touch the graph's shape


def _model(name: str):
    module = zoo.create_model(name, num_classes=10)
    shape = (8, *HW, 3)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return module, calibrate_batch_stats(module, random_variables(module, shape), x), x


@pytest.mark.parametrize("name,pattern", [("mobilenetv2_050", "stages_[45]/"),
                                          ("mobilenetv3_large_100", "stages_[345]/")])
def test_the_split_model_computes_the_same_function(name, pattern):
    """ReLU6 and hard-swish blocks, with and without squeeze-excite (it sees the joined map)."""
    module, variables, x = _model(name)
    def split_apply(v, x):
        with split_top_row(pattern):
            return module.apply(v, x)

    ref = np.asarray(jax.jit(lambda v, x: module.apply(v, x))(variables, x))
    got = np.asarray(jax.jit(split_apply)(variables, x))
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())  # float rounding only


def test_training_mode_batchnorm_sees_the_whole_map():
    """Batch statistics are not per position: in train mode the bands are joined before each BatchNorm."""
    module, variables, x = _model("mobilenetv2_050")
    x = 1.5 * x[::-1] + 0.5  # statistics unlike the running ones (set from x)

    def train_step(v, x, split: bool):
        with split_top_row("stages_[45]/") if split else contextlib.nullcontext():
            return module.apply(v, x, train=True, mutable=["batch_stats"])

    (ref, ref_stats), (got, got_stats) = (jax.jit(train_step, static_argnums=2)(variables, x, s) for s in (False, True))
    assert np.abs(np.asarray(got) - np.asarray(ref)).max() <= 1e-4 * max(1.0, np.abs(np.asarray(ref)).max())
    leaves = zip(jax.tree_util.tree_leaves(ref_stats), jax.tree_util.tree_leaves(got_stats))
    assert all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in leaves)


def test_bands_keep_per_position_ops_apart_and_join_for_the_rest():
    x = np.arange(2 * 4 * 3 * 5, dtype=np.float32).reshape(2, 4, 3, 5)
    bands = split_rows(x)
    assert bands.shape == x.shape and bands.top.shape == (2, 1, 3, 5) and bands.rest.shape == (2, 3, 3, 5)
    summed = bands + split_rows(2 * x)
    assert isinstance(summed, RowBands) and np.array_equal(summed.joined(), 3 * x)
    assert np.array_equal(bands + x, 2 * x)  # with a whole map: joined first
    with pytest.raises(ValueError, match="at least 2 rows"):
        split_rows(x[:, :1])


def test_int8_export_is_full_int8_in_one_partition_and_records_the_split(tmp_path):
    module, variables, x = _model("mobilenetv2_050")
    out = tmp_path / "split.tflite"
    res = to_tflite(module, variables, quantization="int8", representative_data=x, input_hw=HW, out=out,
                    int8_split_top_row="stages_[45]/", **FAST)
    print("\n" + res.summary())
    assert res.ops.ops.get("SLICE", 0) >= 2 and res.ops.ops.get("CONCATENATION", 0) >= 2
    assert res.ops.quantized_activations and not res.ops.float_islands
    assert res.delegate.partitions == 1 and not res.delegate.not_delegated
    assert res.metadata["int8_split_top_row"] == "stages_[45]/"


def test_bad_patterns_are_refused():
    module, variables, x = _model("mobilenetv2_050")
    with pytest.raises(ValueError, match="int8 rewrite"):
        to_tflite(module, variables, quantization="fp16", input_hw=HW, int8_split_top_row="stages_5/", progress=False)
    with pytest.raises(ValueError, match="not a valid regex"):
        to_tflite(module, variables, quantization="int8", representative_data=x, input_hw=HW,
                  int8_split_top_row="stages_[5", **FAST)
    with pytest.raises(ValueError, match="matched no block projection"):
        to_tflite(module, variables, quantization="int8", representative_data=x, input_hw=HW,
                  int8_split_top_row="stage5", **FAST)
